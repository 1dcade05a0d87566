"""Reading a session's cache back from disk, in two halves.

On the reader thread (`read_session_files`): wait for the session's queued writes (they hold its
newest turns), read its manifest and, in order, each chunk file it names, each checked against its
size and sha256 and parsed into MLX arrays; stop at the first that fails. On the generation thread
(`check_chunks`): view them as their dtypes, check each against the model's cache layout; use each
as far as its token ids and memory writes agree with the session's history (a session's files may
be a turn behind it: a kill between its save and its chunk write, a failed write), and stop there
or at the first that fails. Whatever stopped it is logged: the engine replays from there, so a bad
file costs time, never a wrong answer or a failed request.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidecar.delta.cache_chunks import CacheChunk, CacheLayout, cache_chunk
from sidecar.kvcache.disk_files import (
    MANIFEST,
    ChunkEntry,
    KvFileError,
    KvReadError,
    ParsedChunk,
    decode_chunk,
    parse_chunk,
    read_chunk_bytes,
    read_manifest,
)
from sidecar.kvcache.disk_folders import DiskLayout, is_real_dir
from sidecar.kvcache.disk_index import DiskIndex, History
from sidecar.kvcache.disk_writer import DiskWriter
from sidecar.sessions.state import common_prefix

# How long restoring a session waits for its own queued writes (on the reader thread).
PENDING_WAIT_S = 30.0
ANOTHER_MODEL = "written for another model, adapter or KV format"


@dataclass(frozen=True)
class ReadChunk:
    """A chunk entry and its file's checked and parsed contents (None: a shared prefix held in memory)."""

    entry: ChunkEntry
    parsed: ParsedChunk | None


@dataclass(frozen=True)
class SessionFiles:
    """The chunks read, in order, and why reading stopped before the history's end (None: it did not)."""

    chunks: list[ReadChunk]
    reason: str | None
    read_error: str | None = None  # a file that could not be read at all (counted for /health)


def read_session_files(
    layout: DiskLayout, index: DiskIndex, writer: DiskWriter, name: str, wanted: int, held: frozenset[str],
    fingerprint: str,
) -> SessionFiles:  # fmt: skip
    """A session's chunk files covering up to `wanted` tokens (on the reader thread; `held`: the shared
    prefixes the generation thread holds in memory, not read again)."""
    if not writer.wait(name, PENDING_WAIT_S):
        return SessionFiles([], "its queued writes did not end in time")
    folder = layout.session_dir(name)
    if not is_real_dir(folder):
        return SessionFiles([], "no files (or not a folder of the disk cache)")
    try:
        manifest = read_manifest(folder / MANIFEST)
    except KvFileError as exc:
        return SessionFiles([], str(exc))
    if manifest.fingerprint != fingerprint:
        return SessionFiles([], ANOTHER_MODEL)
    chunks: list[ReadChunk] = []
    for entry in manifest.chunks:
        if entry.start >= wanted:
            break
        try:
            chunks.append(ReadChunk(entry, _read_entry(layout, index, folder, entry, held, fingerprint)))
        except KvReadError as exc:
            return SessionFiles(chunks, str(exc), read_error=str(exc))
        except KvFileError as exc:
            return SessionFiles(chunks, str(exc))
    return SessionFiles(chunks, None)


def _read_entry(
    layout: DiskLayout, index: DiskIndex, folder: Path, entry: ChunkEntry, held: frozenset[str], fingerprint: str
) -> ParsedChunk | None:
    if entry.prefix is None:
        data = read_chunk_bytes(folder / (entry.file or ""), entry.sha256 or "", entry.nbytes)
        return parse_chunk(data, entry.file or "", fingerprint)
    if entry.prefix in held:
        return None
    with index.lock:
        record = index.touch_prefix(entry.prefix)
    if record is None:
        raise KvFileError(f"shared prefix {entry.prefix[:12]} is no longer on disk")
    data = read_chunk_bytes(layout.prefix_file(entry.prefix), record.sha256, record.nbytes)
    return parse_chunk(data, f"of prefix {entry.prefix}", fingerprint)


def check_chunks(
    files: SessionFiles, history: History, held: dict[str, list[Any]], layout: CacheLayout
) -> tuple[list[CacheChunk], str | None, CacheChunk | None]:
    """The chunks that match the history, in order (on the generation thread); why they stop before its
    end; the shared prefix, if it was read from disk whole (worth keeping in memory)."""
    chunks: list[CacheChunk] = []
    prefix_read = None
    for read in files.chunks:
        entry = read.entry
        end = min(entry.end, len(history.tokens))
        try:
            if read.parsed is None:
                chunk, stored = cache_chunk(held[entry.prefix or ""], 0), list(history.tokens[: entry.end])
            else:
                chunk = decode_chunk(read.parsed, entry.file or f"of prefix {entry.prefix}", layout)
                stored = read.parsed.tokens
            if chunk.start != entry.start or chunk.end < end:
                raise KvFileError(f"chunk at token {entry.start} holds tokens [{chunk.start}, {chunk.end}) only")
        except KvFileError as exc:
            return chunks, str(exc), prefix_read
        agreed, differs = _agreement(entry, stored, history, end)
        if agreed > entry.start:
            chunks.append(chunk.cut(agreed))
        if differs is not None:
            reason = f"chunk at token {entry.start} holds other {differs} than the history from token {agreed}"
            return chunks, reason, prefix_read
        if entry.prefix is not None and read.parsed is not None and end == entry.end == chunk.end:
            prefix_read = chunk
    if files.reason is not None:
        return chunks, files.reason, prefix_read
    reason = None if chunks and chunks[-1].end == len(history.tokens) else "the files end early"
    return chunks, reason, prefix_read


def _agreement(entry: ChunkEntry, stored: list[int], history: History, end: int) -> tuple[int, str | None]:
    """How far a chunk agrees with the history's first `end` tokens, and what differs from there ("tokens",
    "memory writes"; None: nothing). A chunk written before the history last changed (its turn's
    internal-context message since dropped, a newer turn's write lost to a kill) agrees up to there,
    and that much is used."""
    agreed = entry.start + common_prefix(stored[: end - entry.start], history.tokens[entry.start : end])
    if [w for w in entry.writes if w[0] < agreed] != [w for w in history.writes if entry.start <= w[0] < agreed]:
        return entry.start, "memory writes"
    if any(w[0] == agreed for w in entry.writes) and not any(w[0] == agreed for w in history.writes):
        # Its δ-state there may hold a memory write the history does not: stop short of it.
        return max(entry.start, agreed - 1), "memory writes"
    return agreed, None if agreed == end else "tokens"
