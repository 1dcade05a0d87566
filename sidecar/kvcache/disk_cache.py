"""The disk cache: each session's KV and δ record, and the shared prefixes, kept on disk across restarts.

Layout under `<state dir>/kv/` (sidecar/kvcache/disk_folders.py): `sessions/<key hash>.<mode>/`
holds `manifest.json` and that session's chunk files `<n>.safetensors`; `prefixes/<id>.json` +
`<id>.safetensors`, each shared prefix once. Its parts, one job each: the encoder and writer
threads and their queues (disk_writer.py), the reader thread with a deadline per read (disk_reader.py), reading a
session back and checking it (disk_restore.py), the tables and the byte budget (disk_index.py), the
folders and the start-up scan (disk_folders.py), the file formats (disk_files.py).

The generation thread never touches a file: it takes a finished turn's chunk (`take_session`) and
hands it to the writer's encoder thread (`queue_write`: no byte is copied on the generation thread,
see disk_writer.py); to restore it hands the read over (`read_session`), goes on with the
other rows while the read runs, then decodes, checks and fills (`restore`). Any failure on the way
(a file that fails a check, a read that fails or stalls, arrays that do not fit the model's cache)
ends in a replay from where the good files end, with a log line saying why, never a failed request.
Total bytes stay under `max_bytes`: least recently used sessions go first, then shared prefixes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidecar.delta.api import restorable_offset
from sidecar.delta.cache_chunks import CacheChunk, CacheLayout, fill_cache
from sidecar.kvcache.disk_files import (
    KvFileError,
    KvReadError,
    ParsedChunk,
    PrefixRecord,
    decode_chunk,
    parse_chunk,
    read_chunk_bytes,
    tokens_digest,
)
from sidecar.kvcache.disk_folders import DiskLayout, scan
from sidecar.kvcache.disk_index import DiskIndex, History, history_of
from sidecar.kvcache.disk_reader import READ_DEADLINE_S, DiskReader, PendingRead, ReadStalled
from sidecar.kvcache.disk_restore import PENDING_WAIT_S, SessionFiles, check_chunks, read_session_files
from sidecar.kvcache.disk_writer import DiskCounters, DiskWriter, PendingChunk
from sidecar.sessions.state import Session, SnippetWrite

log = logging.getLogger("sidecar.kvcache.disk_cache")

# How often the generation thread looks at a pending read between two steps of the other rows.
READ_POLL_S = 0.005

NewCache = Callable[[], list[Any]]
# An empty cache for a restore, given the shared prefix chunk the files start with (None: none whole).
RestoreStart = Callable[[CacheChunk | None], list[Any]]
# A shared prefix kept in memory for exactly these tokens (not to be changed), or None.
HeldPrefix = Callable[[list[int]], list[Any] | None]


@dataclass(frozen=True)
class Restored:
    """A session's cache read back from disk: the tokens it holds and the memory writes among them."""

    length: int
    cache: list[Any]
    snippet_writes: list[SnippetWrite]


@dataclass(frozen=True)
class SessionRead:
    """A session's restore in progress: its files being read, and what the generation thread keeps."""

    session: Session
    history: History
    held: dict[str, list[Any]]  # shared prefixes in memory that its files may start with, by id
    pending: PendingRead[SessionFiles]


@dataclass(frozen=True)
class PrefixRead:
    """A shared prefix's file being read."""

    length: int
    tokens: list[int]
    pending: PendingRead[ParsedChunk]


def until_read(read: SessionRead | PrefixRead | None) -> Generator[None, None, None]:
    """Yield (the other rows take their steps) until a read has ended; a pipeline's `yield from`."""
    while read is not None and not read.pending.wait(READ_POLL_S):
        yield


class KvDisk:
    """Sessions' and shared prefixes' caches on disk, within a byte budget."""

    def __init__(
        self, root: Path, max_bytes: int, fingerprint: Callable[[], str], layout: CacheLayout,
        read_deadline_s: float = READ_DEADLINE_S,
    ):  # fmt: skip
        self.layout = layout
        self.folders = DiskLayout(root)
        self.folders.make()
        self._fingerprint = fingerprint
        self.counters = DiskCounters()
        self.index = DiskIndex(max_bytes, *scan(self.folders))
        self.writer = DiskWriter(self.folders, self.index, self.counters, fingerprint)
        self.reader = DiskReader(read_deadline_s)
        self._read_error: str | None = None
        self.writer.enforce_budget(keep="")

    # ---- writing (the generation thread's side) --------------------------------------------

    def take_session(self, session: Session) -> PendingChunk | None:
        """The chunk a finished turn adds to the session's files (its arrays are taken, not yet encoded)."""
        return self.writer.take_session(session)

    def take_prefix(self, mode: str, tokens: list[int], cache: list[Any]) -> PendingChunk | None:
        """The chunk of a new shared prefix, unless it is on disk (or on its way) already."""
        return self.writer.take_prefix(mode, tokens, cache)

    def queue_write(self, pending: PendingChunk | None) -> None:
        """Queue a taken chunk for the encoder and writer threads; with no room it is written with the next turn."""
        self.writer.queue_write(pending)

    # ---- restoring a session ------------------------------------------------------------------

    def read_session(self, session: Session, in_memory: HeldPrefix) -> SessionRead:
        """Start reading a session's files back (on the reader thread); `in_memory` gives the shared
        prefixes held in memory, which are not read again."""
        history, fingerprint = history_of(session), self._fingerprint()
        with self.index.lock:
            records = [(i, r.length, r.tokens_sha256) for i, r in self.index.prefixes.items() if r.sha256]
        held = {}
        for prefix_id, length, digest in records:
            if length <= len(history.tokens) and tokens_digest(list(history.tokens[:length])) == digest:
                cache = in_memory(list(history.tokens[:length]))
                if cache is not None:
                    held[prefix_id] = cache
        name, wanted, ids = session.file_stem, len(history.tokens), frozenset(held)
        pending = self.reader.read(
            lambda: read_session_files(self.folders, self.index, self.writer, name, wanted, ids, fingerprint)
        )
        return SessionRead(session, history, held, pending)

    def restore(self, read: SessionRead, new_cache: RestoreStart) -> Restored | None:
        """The session's cache, once its read has ended, for as much of its history as the files hold
        and pass every check, or None; logs why it stopped early. Never raises."""
        session, history = read.session, read.history
        try:
            files = self._ended(read.pending)
            if files.read_error is not None:
                self._read_failed(files.read_error, stalled=False)
            loaded = sum(1 for c in files.chunks if c.entry.prefix is not None and c.parsed is not None)
            self.counters.add(prefix_loads=loaded)
            chunks, reason, prefix_read = check_chunks(files, history, read.held, self.layout)
            # A shared prefix the files start with, whole (held in memory, or read with them): the
            # new cache may reference it instead of holding a copy.
            first = files.chunks[0] if chunks else None
            whole = first is not None and first.parsed is None and chunks[0].end == first.entry.end
            held = chunks[0] if whole else None
            cache, length = new_cache(prefix_read or held), 0
            if chunks:
                fill_cache(cache, chunks)
                length = _restorable_point(cache, chunks[-1].end, history.writes, session.safe_offset)
                for layer in cache:
                    layer.trim(layer.offset - length)
        except Exception as exc:  # any failure to rebuild from disk is a replay, never a failed request
            log.warning("session %s: its disk cache files cannot be used, replayed: %s", session.file_stem[:12], exc)
            chunks, reason, prefix_read, length = [], str(exc), None, 0
        self._count_restore(session.file_stem, length, len(history.tokens), reason)
        self.writer.restored(session.file_stem, History(history.tokens[:length], _writes_before(history, length)))
        if length == 0:
            return None
        return Restored(length, cache, [w for w in session.snippet_writes if w.offset < length])

    # ---- shared prefixes ------------------------------------------------------------------

    def read_prefix(self, mode: str, tokens: list[int]) -> PrefixRead | None:
        """Start reading the longest shared prefix of `tokens` on disk, or None when there is none."""
        with self.index.lock:
            found = self.index.longest_prefix(self._fingerprint(), mode, tokens, limit=len(tokens))
            record = self.index.touch_prefix(found[0]) if found is not None else None
        if found is None:
            return None
        prefix_id, fingerprint = found[0], self._fingerprint()
        path = self.folders.prefix_file(prefix_id)

        def read() -> ParsedChunk:
            if not self.writer.wait(prefix_id, PENDING_WAIT_S):
                raise KvFileError("its write did not end in time")
            written = record or self._written_prefix(prefix_id)
            data = read_chunk_bytes(path, written.sha256, written.nbytes)
            return parse_chunk(data, "of a shared prefix", fingerprint)

        return PrefixRead(found[1].length, tokens[: found[1].length], self.reader.read(read))

    def load_prefix(self, read: PrefixRead, new_cache: NewCache) -> tuple[int, list[Any]] | None:
        """The shared prefix's cache once its read has ended, or None (logged)."""
        try:
            parsed = self._ended(read.pending)
            chunk = decode_chunk(parsed, "of a shared prefix", self.layout)
            if parsed.tokens != read.tokens or chunk.start != 0 or chunk.end != read.length:
                raise KvFileError("it holds other tokens than its record")
            cache = new_cache()
            fill_cache(cache, [chunk])
        except Exception as exc:  # a replay, never a failed request
            log.warning("a shared prefix on disk was not used: %s", exc)
            self.counters.add(fallbacks=1)
            return None
        self.counters.add(prefix_loads=1)
        return read.length, cache

    # ---- the rest ---------------------------------------------------------------------------

    def wait(self, name: str, timeout: float = PENDING_WAIT_S) -> bool:
        """Wait until the chunks queued for a session or prefix are written; False on timeout."""
        return self.writer.wait(name, timeout)

    def remove(self, name: str) -> bool:
        """Delete a session's files now (its queued writes are dropped); True if it had any. Raises OSError."""
        return self.writer.remove(name)

    def problems(self) -> list[str]:
        """Lines for /health while writes fail or a read stalls; empty once a write works again."""
        found = []
        if self.writer.failing:
            failures = self.counters.snapshot()["write_failures"]
            found.append(f"the disk cache cannot write: {self.writer.last_error} ({failures} failed writes so far)")
        stalled = self.reader.stalled()
        if stalled is not None:
            found.append(f"{stalled}: sessions are replayed instead of read back")
        return found

    def stats(self) -> dict[str, Any]:
        """Bytes, entries and counters, for /health."""
        with self.index.lock:  # never held through a disk write: /health does not wait for one
            bytes_now, sessions = self.index.total_bytes(), len(self.index.sessions)
            prefixes = self.index.written_prefixes()
        return {
            "enabled": True,
            "max_bytes": self.index.max_bytes,
            "bytes": bytes_now,
            "sessions": sessions,
            "prefixes": prefixes,
            **self.counters.snapshot(),
            "queued": self.writer.queued,
            "last_error": self.writer.last_error,
            "last_read_error": self._read_error,
        }

    def close(self, timeout: float = 30.0) -> None:
        """Write what is queued (for at most `timeout` seconds) and stop the threads."""
        self.reader.close()
        self.writer.close(timeout)

    def _ended(self, pending: PendingRead[Any]) -> Any:
        """An ended read's result; raises what it failed with (a failed or stalled read counted for /health)."""
        error = pending.error
        if error is None:
            return pending.result
        if isinstance(error, ReadStalled) or isinstance(error, KvReadError) or not isinstance(error, KvFileError):
            self._read_failed(str(error), stalled=isinstance(error, ReadStalled))
        raise error

    def _read_failed(self, error: str, stalled: bool) -> None:
        self.counters.add(**{"stalled_reads" if stalled else "read_failures": 1})
        self._read_error = error

    def _written_prefix(self, prefix_id: str) -> PrefixRecord:
        with self.index.lock:
            record = self.index.touch_prefix(prefix_id)
        if record is None:
            raise KvFileError(f"shared prefix {prefix_id[:12]} was not written")
        return record

    def _count_restore(self, name: str, length: int, wanted: int, reason: str | None) -> None:
        kind = "hits" if length == wanted and wanted > 0 else "partial_hits" if length > 0 else "fallbacks"
        self.counters.add(**{kind: 1, "restored_tokens": length})
        if length < wanted and reason is not None:
            log.info("session %s: %d of %d tokens from disk, the rest replayed: %s", name[:12], length, wanted, reason)


def _writes_before(history: History, length: int) -> tuple[tuple[int, str], ...]:
    return tuple(w for w in history.writes if w[0] < length)


def _restorable_point(
    cache: list[Any], length: int, writes: Sequence[tuple[int, str]], safe: Callable[[int], int]
) -> int:
    """The largest offset ≤ `length` whose δ-state the cache keeps exactly, where the history may be cut
    (`safe`: never inside a message-mean write) and where no memory write happened (a write there
    would leave it unclear whether the state holds it)."""
    at = {w[0] for w in writes}
    while length > 0:
        cut = safe(restorable_offset(cache, length))
        if cut == length and cut not in at:
            return cut
        length = cut if cut < length else length - 1
    return 0
