"""What saved sessions depend on, by content: a hash of every model and adapter file the loaders read.

A session file records the fingerprint it was written under; a file whose fingerprint differs was
written for other weights, another tokenizer or another adapter, and is ignored. The hash covers
the files' bytes, so an adapter swapped for another with the same shapes, sizes and times is seen.

Hashing runs on a background thread while the server starts answering (sha256 reads a 2.3 GB
model in about 1.4 s here); the first session file read or written waits for it. A model loaded
again in the same process (after an idle unload) reuses the hash while every file still has the
same inode, size and change times, so the return turn's disk restore does not wait for it again.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from sidecar.delta.adapter_files import NPZ_FILE, PT_FILE
from sidecar.delta.config import CONFIG_FILE

log = logging.getLogger("sidecar.sessions.fingerprint")

# What mlx-lm reads from a model folder (and what the installer downloads): config, weights,
# tokenizer and chat template. Other files in the folder do not change the model.
MODEL_FILE_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.jinja", "tokenizer.model", "*.tiktoken")
PREFIX = "sha256:"


class SessionFingerprint:
    """The fingerprint of the files being served: by content once hashed, and the older kind."""

    def __init__(self, model_id: str, model_path: str, adapter_path: str | None) -> None:
        self.legacy = legacy_fingerprint(model_id, model_path, adapter_path)
        self._content = _content_future(model_path, adapter_path)

    @property
    def current(self) -> str:
        """The content fingerprint (waits for the hash on first use)."""
        return self._content.result()


# Content hashes this process computed, by the identity of the files they cover (see _file_identity).
_hashed: dict[tuple[object, ...], Future[str]] = {}
_hashed_lock = threading.Lock()


def _content_future(model_path: str, adapter_path: str | None) -> Future[str]:
    """The content hash of these files: the one already computed while they are unchanged, else a new one."""
    identity = _file_identity(model_path, adapter_path)
    with _hashed_lock:
        known = _hashed.get(identity) if identity is not None else None
        if known is not None and not (known.done() and known.exception() is not None):
            return known
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fingerprint")
        future = pool.submit(content_fingerprint, model_path, adapter_path)
        pool.shutdown(wait=False)  # the thread ends with its one task
        if identity is not None:
            _hashed[identity] = future
        return future


def _file_identity(model_path: str, adapter_path: str | None) -> tuple[object, ...] | None:
    """Paths, inodes, sizes and modification and change times: what a replaced or rewritten file changes.

    None when the folders cannot be listed (the hash then fails on its own, and is not kept).
    """
    identity: list[object] = [model_path, adapter_path]
    try:
        files = served_files(model_path, adapter_path)
    except OSError:
        return None
    for role, path in files:
        try:
            stat = path.stat()
        except OSError:
            identity.append((role, path.name, None))
            continue
        identity.append((role, path.name, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns))
    return tuple(identity)


def served_files(model_path: str, adapter_path: str | None) -> list[tuple[str, Path]]:
    """The model and adapter files the loaders read, each with its role, in a fixed order."""
    files = [
        ("model", path)
        for path in sorted(Path(model_path).iterdir())
        if path.is_file() and any(fnmatch.fnmatch(path.name, pattern) for pattern in MODEL_FILE_PATTERNS)
    ]
    if adapter_path is not None:
        adapter = Path(adapter_path)
        # The loader takes the npz when there is one, else the .pt (sidecar/delta/adapter_files.py).
        weights = adapter / NPZ_FILE if (adapter / NPZ_FILE).is_file() else adapter / PT_FILE
        files += [("adapter", adapter / CONFIG_FILE), ("adapter", weights)]
    return files


def content_fingerprint(model_path: str, adapter_path: str | None) -> str:
    """sha256 over the role, name, size and bytes of every file the loaders read."""
    began = time.perf_counter()
    digest = hashlib.sha256()
    total = 0
    files = served_files(model_path, adapter_path)
    for role, path in files:
        with path.open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            content = hashlib.file_digest(handle, "sha256").digest()
        total += size
        digest.update(f"{role}/{path.name}:{size}:".encode() + content)
    elapsed = time.perf_counter() - began
    log.info("fingerprinted %d model and adapter files (%.1f MB) in %.2f s", len(files), total / 1e6, elapsed)
    return PREFIX + digest.hexdigest()


def legacy_fingerprint(model_id: str, model_path: str, adapter_path: str | None) -> str:
    """The fingerprint of session files written before content hashing: names, sizes, whole-second times."""
    digest = hashlib.sha256(model_id.encode())
    for root in filter(None, (model_path, adapter_path)):
        for path in sorted(Path(root).glob("*")):
            if path.suffix in (".json", ".safetensors", ".npz", ".pt") and path.is_file():
                stat = path.stat()
                digest.update(f"{path.name}:{stat.st_size}:{int(stat.st_mtime)}".encode())
    return digest.hexdigest()[:32]
