"""The disk cache's files: chunk files (safetensors), session manifests and prefix records (JSON).

A chunk file holds one `CacheChunk` (see sidecar/delta/cache_chunks.py) and the token ids it
covers; its metadata names the fingerprint it was written under. It is encoded with numpy from views
of MLX's buffers (`chunk_on_host`, then `encode_chunk` on another thread) and read back the same
way round: parsed with numpy on the reader thread (`parse_chunk`), viewed and checked on the
generation thread (`decode_chunk`). Files are written to a temporary name, fsynced and renamed, so a
reader sees a whole file or none; a manifest names each chunk with its size and sha256, so a
truncated or damaged chunk is seen before it is parsed, and its arrays are checked against the
model's cache layout before they are used. Every field read from disk is checked (sizes never
negative, token ranges in order and contiguous, plain file names, hex ids); files are read only if
they are regular files, never through a link. Never pickle.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import re
import struct
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from common.files import atomic_write_bytes, atomic_write_json, read_regular_file
from sidecar.delta.cache_chunks import CacheChunk, CacheLayout, check_chunk

FORMAT = 1
CHUNK_SUFFIX = ".safetensors"
MANIFEST = "manifest.json"
# A manifest lists chunks and memory-write digests: kilobytes. Anything far larger is not ours.
MAX_JSON_BYTES = 16 * 1024**2
_CHUNK_NAME = re.compile(r"[0-9]{1,12}\.safetensors")
_PREFIX_ID = re.compile(r"[0-9a-f]{32}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class KvFileError(ValueError):
    """A chunk or manifest that cannot be used; the message says why (logged, then replayed)."""


class KvReadError(KvFileError):
    """A file that cannot be read at all (missing, not a regular file, a link, an I/O error)."""


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


# Safetensors' name for each dtype a cache chunk holds, and the dtype its bits are read as on the host
# (numpy has no bfloat16: its bits are read as uint16, a view MLX makes without a copy).
_SAFETENSORS_DTYPES: dict[mx.Dtype, tuple[str, mx.Dtype]] = {
    mx.float32: ("F32", mx.float32),
    mx.float16: ("F16", mx.float16),
    mx.bfloat16: ("BF16", mx.uint16),
    mx.uint32: ("U32", mx.uint32),
    mx.int32: ("I32", mx.int32),
}


# Each safetensors dtype read back: the numpy dtype its bits are read as on the host (little-endian, as
# written), and the MLX dtype they are viewed as.
_HOST_DTYPES: dict[str, np.dtype[Any]] = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "U32": np.dtype("<u4"),
    "I32": np.dtype("<i4"),
}
_MLX_DTYPES: dict[str, mx.Dtype] = {kind: dtype for dtype, (kind, _) in _SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class HostChunk:
    """A chunk whose arrays are numpy views of MLX's evaluated buffers, each with its safetensors dtype:
    what the writer's encoder thread turns into bytes without calling MLX."""

    start: int
    end: int
    arrays: dict[str, tuple[str, np.ndarray]]
    records: list[dict[str, Any] | None]


def chunk_on_host(chunk: CacheChunk) -> HostChunk:
    """The chunk's arrays made concrete and viewed through the buffer protocol, on the generation thread
    (MLX work stays on one thread). No K/V byte is copied: they are slices of buffers the turn evaluated."""
    views: dict[str, tuple[str, mx.array]] = {}
    for name, array in chunk.arrays.items():
        if array.dtype not in _SAFETENSORS_DTYPES:
            raise TypeError(f"{name} is {array.dtype}: not a dtype the disk cache stores")
        kind, bits = _SAFETENSORS_DTYPES[array.dtype]
        views[name] = (kind, array if bits == array.dtype else array.view(bits))
    mx.eval([view for _, view in views.values()])
    arrays = {name: (kind, np.asarray(view)) for name, (kind, view) in views.items()}
    return HostChunk(chunk.start, chunk.end, arrays, chunk.records)


def encode_chunk(chunk: HostChunk, tokens: list[int], fingerprint: str) -> bytearray:
    """A chunk as safetensors bytes, built with numpy alone (on the writer's encoder thread, no MLX call):
    each array's bytes are copied once, from MLX's buffer into the file's."""
    arrays = {**chunk.arrays, "tokens": ("I32", np.asarray(tokens, dtype=np.int32))}
    metadata = {
        "format": str(FORMAT),
        "fingerprint": fingerprint,
        "start": str(chunk.start),
        "end": str(chunk.end),
        "records": json.dumps(chunk.records),
    }
    header: dict[str, Any] = {"__metadata__": metadata}
    size = 0
    for name, (kind, array) in arrays.items():
        header[name] = {"dtype": kind, "shape": list(array.shape), "data_offsets": [size, size + array.nbytes]}
        size += array.nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the arrays start 8-byte aligned, as safetensors asks
    data = bytearray(8 + len(head) + size)
    data[: 8 + len(head)] = struct.pack("<Q", len(head)) + head
    position = 8 + len(head)
    for _, array in arrays.values():
        # numpy copies a strided view into place without holding the GIL.
        np.ndarray(array.shape, array.dtype.newbyteorder("<"), data, position)[...] = array
        position += array.nbytes
    return data


def read_chunk_bytes(path: Path, sha256: str, nbytes: int) -> bytes:
    """The bytes of a chunk file, checked against its size and checksum; raises KvFileError.

    A regular file only, never through a link, never more than `nbytes` read: a FIFO, a device or a
    link to /dev/zero in its place is refused at once (this runs on the disk cache's reader thread).
    """
    try:
        data = read_regular_file(path, nbytes, follow_links=False)
    except OSError as exc:
        if exc.errno == errno.EFBIG:
            raise KvFileError(f"chunk {path.name} fails its checksum (larger than its {nbytes} bytes)") from None
        raise KvReadError(f"chunk {path.name} cannot be read: {exc.strerror or exc}") from exc
    if len(data) != nbytes or hashlib.sha256(data).hexdigest() != sha256:
        raise KvFileError(f"chunk {path.name} fails its checksum ({len(data)} bytes: truncated or damaged)")
    return data


@dataclass(frozen=True)
class ParsedChunk:
    """A chunk file's contents, parsed on the reader thread: each array's bits already in an MLX array
    (with its safetensors dtype), its token ids and metadata."""

    start: int
    end: int
    arrays: dict[str, tuple[str, mx.array]]
    records: list[Any]
    tokens: list[int]


def parse_chunk(data: bytes, name: str, fingerprint: str) -> ParsedChunk:
    """A chunk from checked bytes, parsed with numpy and its arrays' bits copied into MLX arrays (on the
    reader thread: an array built from host memory is evaluated already, so nothing of MLX's streams
    is involved, and the copy leaves the generation thread); raises KvFileError."""
    try:
        (head_size,) = struct.unpack_from("<Q", data, 0)
        if head_size > MAX_JSON_BYTES or 8 + head_size > len(data):
            raise ValueError(f"its header of {head_size} bytes overruns the file")
        header = _of_type(json.loads(data[8 : 8 + head_size]), dict)
        metadata = _of_type(header.pop("__metadata__"), dict)
        host = {key: _host_array(data, 8 + head_size, key, spec) for key, spec in header.items()}
        kind, tokens_array = host.pop("tokens")
        if kind != "I32" or tokens_array.ndim != 1:
            raise ValueError(f"its token ids are {kind} {tokens_array.shape}")
        records = json.loads(metadata["records"])
        start, end = int(metadata["start"]), int(metadata["end"])
        written_under = metadata["fingerprint"]
    except (ValueError, KeyError, TypeError, struct.error) as exc:  # JSONDecodeError is a ValueError
        raise KvFileError(f"chunk {name} cannot be decoded: {exc}") from exc
    if written_under != fingerprint:
        raise KvFileError(f"chunk {name} was written for another model, adapter or KV format")
    if not 0 <= start < end or len(tokens_array) != end - start:
        raise KvFileError(f"chunk {name} holds {len(tokens_array)} tokens, not [{start}, {end})")
    if not isinstance(records, list):
        raise KvFileError(f"chunk {name} cannot be decoded: its δ records are not a list")
    arrays = {key: (kind, mx.array(bits)) for key, (kind, bits) in host.items()}
    return ParsedChunk(start, end, arrays, records, tokens_array.tolist())


def decode_chunk(parsed: ParsedChunk, name: str, layout: CacheLayout) -> CacheChunk:
    """The parsed chunk's arrays viewed as their dtypes (no copy) and checked against the model's cache
    layout (on the generation thread, where the views are evaluated); raises KvFileError."""
    arrays = {key: _as_dtype(bits, _MLX_DTYPES[kind]) for key, (kind, bits) in parsed.arrays.items()}
    chunk = CacheChunk(parsed.start, parsed.end, arrays, parsed.records)
    try:
        check_chunk(chunk, layout)
    except ValueError as exc:
        raise KvFileError(f"chunk {name} does not fit this model's cache: {exc}") from None
    return chunk


def _as_dtype(bits: mx.array, dtype: mx.Dtype) -> mx.array:
    return bits if bits.dtype == dtype else bits.view(dtype)


def _host_array(data: bytes, base: int, key: str, spec: Any) -> tuple[str, np.ndarray]:
    """One array of a safetensors file as a numpy view of its bits; raises ValueError unless it fits."""
    kind, shape, (begin, stop) = spec["dtype"], spec["shape"], spec["data_offsets"]
    if kind not in _HOST_DTYPES:
        raise ValueError(f"{key} is {kind}: not a dtype the disk cache stores")
    if not all(isinstance(n, int) and n >= 0 for n in [*shape, begin, stop]):
        raise ValueError(f"{key} has a malformed shape or offsets")
    dtype = _HOST_DTYPES[kind]
    count = math.prod(shape)
    if not begin <= stop <= len(data) - base or stop - begin != count * dtype.itemsize:
        raise ValueError(f"{key}'s {count} values do not fit its offsets [{begin}, {stop})")
    return kind, np.frombuffer(data, dtype, count, base + begin).reshape(shape)


def write_chunk_file(path: Path, data: bytes | bytearray) -> str:
    """Write chunk bytes atomically (owner-only); returns their sha256."""
    atomic_write_bytes(path, data, mode=0o600)
    return hashlib.sha256(data).hexdigest()


def read_manifest(path: Path) -> Manifest:
    """A session's manifest, every field checked; raises KvFileError when missing or malformed."""
    data = _read_json(path)
    try:
        if data["format"] != FORMAT:
            raise ValueError(f"format {data['format']!r} is not {FORMAT}")
        chunks = [_chunk_entry(c) for c in _of_type(data["chunks"], list)]
        manifest = Manifest(
            _of_type(data["fingerprint"], str), _time(data["last_used"]), _size(data["next_file"]), chunks
        )
        _check_chunks(manifest)
    except (KeyError, TypeError, ValueError) as exc:
        raise KvFileError(f"{path.name} is malformed: {exc}") from None
    return manifest


def write_manifest(path: Path, manifest: Manifest) -> None:
    """Write a manifest atomically (owner-only)."""
    data = {"format": FORMAT, **asdict(manifest)}
    atomic_write_json(path, data, mode=0o600)


def read_prefix_record(path: Path) -> PrefixRecord:
    """A shared prefix's record, every field checked; raises KvFileError when missing or malformed."""
    data = _read_json(path)
    try:
        if data.pop("format") != FORMAT or set(data) != {f.name for f in fields(PrefixRecord)}:
            raise ValueError("not a prefix record of this format")
        record = PrefixRecord(**data)
        _of_type(record.fingerprint, str)
        if record.mode not in ("delta", "base") or not isinstance(record.length, int) or record.length <= 0:
            raise ValueError(f"mode {record.mode!r} or length {record.length!r}")
        _digest(record.tokens_sha256), _digest(record.sha256), _size(record.nbytes), _time(record.last_used)
    except (KeyError, TypeError, ValueError) as exc:
        raise KvFileError(f"{path.name} is malformed: {exc}") from None
    return record


def write_prefix_record(path: Path, record: PrefixRecord) -> None:
    """Write a prefix record atomically (owner-only)."""
    atomic_write_json(path, {"format": FORMAT, **asdict(record)}, mode=0o600)


def tokens_digest(tokens: list[int]) -> str:
    """sha256 of token ids, to match a prompt against a stored prefix without reading it."""
    return hashlib.sha256(np.asarray(tokens, dtype=np.int32).tobytes()).hexdigest()


def is_chunk_name(name: str) -> bool:
    """A session's chunk file name as the writer makes them: `<n>.safetensors`."""
    return _CHUNK_NAME.fullmatch(name) is not None


def is_prefix_id(name: str) -> bool:
    """A shared prefix's id (its files' stem): 32 lowercase hex digits."""
    return _PREFIX_ID.fullmatch(name) is not None


def _chunk_entry(c: Any) -> ChunkEntry:
    c = _of_type(c, dict)
    writes = [(_size(o), _of_type(d, str)) for o, d in _of_type(c.get("writes", []), list)]
    entry = ChunkEntry(_size(c["start"]), _size(c["end"]), c.get("file"), c.get("sha256"), _size(c.get("nbytes", 0)),
                       c.get("prefix"), writes)  # fmt: skip
    if (entry.file is None) == (entry.prefix is None):
        raise ValueError("a chunk names a file or a shared prefix, exactly one")
    if entry.file is not None and not is_chunk_name(_of_type(entry.file, str)):
        raise ValueError(f"unexpected file name {entry.file!r}")
    if entry.file is not None:
        _digest(entry.sha256)
    if entry.prefix is not None and not is_prefix_id(_of_type(entry.prefix, str)):
        raise ValueError(f"unexpected shared prefix id {entry.prefix!r}")
    if not entry.start < entry.end or any(not entry.start <= o < entry.end for o, _ in writes):
        raise ValueError(f"tokens [{entry.start}, {entry.end}) out of order, or a memory write outside them")
    return entry


def _check_chunks(manifest: Manifest) -> None:
    """Chunks cover [0, end) in order, each once; files are named below `next_file`, each once."""
    position = 0
    for n, entry in enumerate(manifest.chunks):
        if entry.start != position:
            raise ValueError(f"chunk {n} starts at token {entry.start}, not {position}")
        if entry.prefix is not None and n > 0:
            raise ValueError("a shared prefix after the first chunk")
        position = entry.end
    files = [int(c.file.split(".")[0]) for c in manifest.chunks if c.file is not None]
    if len(set(files)) != len(files) or any(number >= manifest.next_file for number in files):
        raise ValueError("chunk files named twice, or at or after next_file")


def _of_type(value: Any, kind: type) -> Any:
    if not isinstance(value, kind) or isinstance(value, bool):
        raise TypeError(f"{value!r:.40} is not a {kind.__name__}")
    return value


def _size(value: Any) -> int:
    """A count or a size: an int, never negative."""
    if _of_type(value, int) < 0:
        raise ValueError(f"{value} is negative")
    return value


def _time(value: Any) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{value!r:.40} is not a time")
    return float(value)


def _digest(value: Any) -> str:
    if not isinstance(value, str) or _SHA256.fullmatch(value) is None:
        raise ValueError(f"{value!r:.80} is not a sha256")
    return value


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(read_regular_file(path, MAX_JSON_BYTES, follow_links=False))
    except FileNotFoundError:
        raise KvFileError(f"{path.name} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KvFileError(f"{path.name} cannot be read: {exc}") from exc
    if not isinstance(data, dict):
        raise KvFileError(f"{path.name} does not hold a JSON object")
    return data
