"""What saved sessions depend on, by content: a hash of every model and adapter file the loaders read.

A session file records the fingerprint it was written under; a file whose fingerprint differs was
written for other weights, another tokenizer or another adapter, and is ignored. The hash covers
the files' bytes, so an adapter swapped for another with the same shapes, sizes and times is seen.

Hashing runs on a background thread while the server starts answering (sha256 reads a 2.3 GB
model in about 1.4 s here); the first session file read or written waits for it.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import os
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
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fingerprint")
        self._content: Future[str] = pool.submit(content_fingerprint, model_path, adapter_path)
        pool.shutdown(wait=False)  # the thread ends with its one task

    @property
    def current(self) -> str:
        """The content fingerprint (waits for the hash on first use)."""
        return self._content.result()


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
