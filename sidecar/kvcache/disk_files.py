"""The disk cache's files: chunk files (safetensors), session manifests and prefix records (JSON).

A chunk file holds one `CacheChunk` (see sidecar/delta/cache_chunks.py) and the token ids it
covers; its metadata names the fingerprint it was written under. Files are written to a temporary
name, fsynced and renamed, so a reader sees a whole file or none; a manifest names each chunk with
its sha256, so a truncated or damaged chunk is seen before MLX reads it. Never pickle.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from common.files import atomic_write_bytes, atomic_write_json, read_regular_file
from sidecar.delta.cache_chunks import CacheChunk

FORMAT = 1
CHUNK_SUFFIX = ".safetensors"
# A manifest lists chunks and memory-write digests: kilobytes. Anything far larger is not ours.
MAX_JSON_BYTES = 16 * 1024**2


class KvFileError(ValueError):
    """A chunk or manifest that cannot be used; the message says why (logged, then replayed)."""


@dataclass
class ChunkEntry:
    """One chunk of a session: tokens [start, end) from `file` (or from the shared prefix `prefix`)."""

    start: int
    end: int
    file: str | None = None  # in the session's folder
    sha256: str | None = None
    nbytes: int = 0
    prefix: str | None = None  # the id of a shared prefix record instead of a file of its own
    writes: list[tuple[int, str]] = field(default_factory=list)  # memory writes in [start, end): offset, digest

    def cut(self, end: int) -> ChunkEntry:
        """This entry used only up to `end`: the writes at or after it are gone with the tokens."""
        kept = [w for w in self.writes if w[0] < end]
        return ChunkEntry(self.start, min(self.end, end), self.file, self.sha256, self.nbytes, self.prefix, kept)


@dataclass
class Manifest:
    """What a session keeps on disk: its chunks in token order, under one fingerprint."""

    fingerprint: str
    last_used: float
    next_file: int = 0
    chunks: list[ChunkEntry] = field(default_factory=list)

    @property
    def end(self) -> int:
        """Tokens covered."""
        return self.chunks[-1].end if self.chunks else 0

    def cut(self, offset: int) -> list[ChunkEntry]:
        """Keep only tokens [0, offset); returns the entries dropped whole."""
        kept = [c.cut(offset) for c in self.chunks if c.start < offset]
        dropped = [c for c in self.chunks if c.start >= offset]
        self.chunks = kept
        return dropped


@dataclass
class PrefixRecord:
    """A shared prefix on disk: its chunk file and what it holds."""

    fingerprint: str
    mode: str
    length: int
    tokens_sha256: str
    sha256: str
    nbytes: int
    last_used: float


def encode_chunk(chunk: CacheChunk, tokens: list[int], fingerprint: str) -> bytes:
    """A chunk as safetensors bytes (on the caller's thread: MLX work stays on one thread)."""
    arrays = dict(chunk.arrays)
    arrays["tokens"] = mx.array(np.asarray(tokens, dtype=np.int32))
    metadata = {
        "format": str(FORMAT),
        "fingerprint": fingerprint,
        "start": str(chunk.start),
        "end": str(chunk.end),
        "records": json.dumps(chunk.records),
    }
    buffer = io.BytesIO()
    mx.save_safetensors(buffer, arrays, metadata=metadata)
    return buffer.getvalue()


def read_chunk(path: Path, sha256: str, fingerprint: str) -> tuple[CacheChunk, list[int]]:
    """A chunk file checked against its checksum and fingerprint; raises KvFileError."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KvFileError(f"chunk {path.name} cannot be read: {exc.strerror or exc}") from exc
    if hashlib.sha256(data).hexdigest() != sha256:
        raise KvFileError(f"chunk {path.name} fails its checksum ({len(data)} bytes: truncated or damaged)")
    try:
        arrays, metadata = mx.load(io.BytesIO(data), format="safetensors", return_metadata=True)
        records = json.loads(metadata["records"])
        start, end = int(metadata["start"]), int(metadata["end"])
        written_under = metadata["fingerprint"]
        tokens = np.array(arrays.pop("tokens")).tolist()
    except (ValueError, KeyError, RuntimeError, json.JSONDecodeError) as exc:
        raise KvFileError(f"chunk {path.name} cannot be decoded: {exc}") from exc
    if written_under != fingerprint:
        raise KvFileError(f"chunk {path.name} was written for another model, adapter or KV format")
    if len(tokens) != end - start:
        raise KvFileError(f"chunk {path.name} holds {len(tokens)} tokens, not {end - start}")
    return CacheChunk(start, end, arrays, records), tokens


def write_chunk_file(path: Path, data: bytes) -> str:
    """Write chunk bytes atomically (owner-only); returns their sha256."""
    atomic_write_bytes(path, data, mode=0o600)
    return hashlib.sha256(data).hexdigest()


def read_manifest(path: Path) -> Manifest:
    """A session's manifest; raises KvFileError when missing or malformed."""
    data = _read_json(path)
    try:
        if data["format"] != FORMAT:
            raise KvFileError(f"{path.name}: format {data['format']} is not {FORMAT}")
        chunks = [
            ChunkEntry(
                int(c["start"]), int(c["end"]), c.get("file"), c.get("sha256"), int(c.get("nbytes", 0)),
                c.get("prefix"), [(int(o), str(d)) for o, d in c.get("writes", [])],
            )
            for c in data["chunks"]
        ]  # fmt: skip
        manifest = Manifest(str(data["fingerprint"]), float(data["last_used"]), int(data["next_file"]), chunks)
    except (KeyError, TypeError, ValueError) as exc:
        raise KvFileError(f"{path.name} is malformed: {exc}") from exc
    for entry in chunks:
        if entry.file is not None and (Path(entry.file).name != entry.file or not entry.file.endswith(CHUNK_SUFFIX)):
            raise KvFileError(f"{path.name} names an unexpected file {entry.file!r}")
    return manifest


def write_manifest(path: Path, manifest: Manifest) -> None:
    """Write a manifest atomically (owner-only)."""
    data = {"format": FORMAT, **asdict(manifest)}
    atomic_write_json(path, data, mode=0o600)


def read_prefix_record(path: Path) -> PrefixRecord:
    """A shared prefix's record; raises KvFileError when missing or malformed."""
    data = _read_json(path)
    try:
        data.pop("format")
        return PrefixRecord(**data)
    except (KeyError, TypeError) as exc:
        raise KvFileError(f"{path.name} is malformed: {exc}") from exc


def write_prefix_record(path: Path, record: PrefixRecord) -> None:
    """Write a prefix record atomically (owner-only)."""
    atomic_write_json(path, {"format": FORMAT, **asdict(record)}, mode=0o600)


def tokens_digest(tokens: list[int]) -> str:
    """sha256 of token ids, to match a prompt against a stored prefix without reading it."""
    return hashlib.sha256(np.asarray(tokens, dtype=np.int32).tobytes()).hexdigest()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(read_regular_file(path, MAX_JSON_BYTES))
    except FileNotFoundError:
        raise KvFileError(f"{path.name} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KvFileError(f"{path.name} cannot be read: {exc}") from exc
    if not isinstance(data, dict):
        raise KvFileError(f"{path.name} does not hold a JSON object")
    return data
