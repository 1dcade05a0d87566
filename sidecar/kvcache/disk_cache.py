"""The disk cache: each session's KV and δ record, and the shared prefixes, kept on disk across restarts.

Layout under `<state dir>/kv/`: `sessions/<key hash>.<mode>/manifest.json` and that session's chunk
files `<n>.safetensors`; `prefixes/<id>.json` + `<id>.safetensors`, each shared prefix once. A
turn adds one chunk: the tokens from where the session last diverged from what is on disk (the
manifest is cut there) to its end. The generation thread takes the chunk's arrays and encodes them; a
writer thread writes the file, then the manifest, then removes the chunks cut away, so a kill at
any moment leaves the old manifest or the new one, both whole. Writes never hold up an answer: the
queue is bounded, and a turn that finds it full is written with the next one.

Restoring checks every chunk (sha256, fingerprint of model, adapter, dtype and KV format, its token
ids and memory writes against the session's history) and stops at the first that fails, with a log
line saying why: the engine replays from there, so a bad file costs time, never a wrong answer.
Total bytes stay under `max_bytes`: least recently used sessions go first, then shared prefixes.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidecar.delta.api import restorable_offset
from sidecar.delta.cache_chunks import CacheChunk, cache_chunk, fill_cache
from sidecar.kvcache.disk_files import (
    CHUNK_SUFFIX,
    ChunkEntry,
    KvFileError,
    Manifest,
    PrefixRecord,
    encode_chunk,
    read_chunk,
    read_manifest,
    read_prefix_record,
    tokens_digest,
    write_chunk_file,
    write_manifest,
    write_prefix_record,
)
from sidecar.sessions.state import Session, SnippetWrite, common_prefix
from sidecar.sessions.store import describe_os_error

log = logging.getLogger("sidecar.kvcache.disk_cache")

MANIFEST = "manifest.json"
QUEUE_LENGTH = 8
# How long restoring a session waits for its own queued writes (they hold its newest turn).
PENDING_WAIT_S = 30.0


@dataclass(frozen=True)
class History:
    """What a session's cache holds on disk, or will once the queued writes are done."""

    tokens: tuple[int, ...]
    writes: tuple[tuple[int, str], ...]


@dataclass(frozen=True)
class Restored:
    """A session's cache read back from disk: the tokens it holds, the memory writes among them, and
    the shared prefix it starts with if that was read from disk (None when it came from memory)."""

    length: int
    cache: list[Any]
    snippet_writes: list[SnippetWrite]
    prefix_read: CacheChunk | None


NewCache = Callable[[], list[Any]]
# A shared prefix kept in memory for exactly these tokens (not to be changed), or None.
SharedPrefix = Callable[[list[int]], list[Any] | None]


@dataclass
class _Job:
    """One write for the writer thread: a session's new chunk, or a shared prefix."""

    name: str  # session folder or prefix id
    data: bytes
    start: int
    end: int
    history: History | None = None  # sessions: the history once written
    cut: int = 0  # sessions: where the manifest is cut before the chunk is added
    prefix: tuple[str, int] | None = None  # sessions: a shared prefix as the first chunk
    record: PrefixRecord | None = None  # prefixes
    generation: int = 0


class _Behind(Exception):
    """A chunk that cannot go on its session's files: an earlier write failed, so it would leave a gap."""


@dataclass
class PendingChunk:
    """A chunk taken on the generation thread, to be encoded (`submit`) once the answer has ended."""

    job: _Job
    chunk: CacheChunk
    tokens: list[int]


@dataclass
class DiskCounters:
    """What /health reports about the disk cache."""

    hits: int = 0  # restores that brought back every token asked for
    partial_hits: int = 0  # restores that stopped early (the rest was replayed)
    fallbacks: int = 0  # restores that found nothing usable on disk (replayed)
    restored_tokens: int = 0
    prefix_loads: int = 0  # shared prefixes read from disk (each is kept in memory afterwards)
    writes: int = 0
    bytes_written: int = 0
    write_failures: int = 0
    skipped_writes: int = 0  # queue full: written with the session's next turn
    evictions: int = 0


class KvDisk:
    """Sessions' and shared prefixes' caches on disk, within a byte budget."""

    def __init__(self, root: Path, max_bytes: int, fingerprint: Callable[[], str]):
        self.root = root
        self.max_bytes = max_bytes
        self._fingerprint = fingerprint
        self.counters = DiskCounters()
        self.last_error: str | None = None
        # Two locks, always taken in this order: the files (the writer holds it through an fsync) and
        # the tables below (held briefly, so that taking a turn's chunk never waits for a disk).
        self._files = threading.Lock()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._planned: dict[str, History] = {}  # what each session will hold once its queue drains
        self._committed: dict[str, History] = {}  # what its manifest holds now
        self._generation: Counter[str] = Counter()  # bumped when a session is removed
        self._pending: Counter[str] = Counter()
        self._sessions: dict[str, list[float]] = {}  # folder → [last used, bytes]
        self._prefixes: dict[str, PrefixRecord] = {}
        self._queue: queue.Queue[_Job | None] = queue.Queue(QUEUE_LENGTH)
        (root / "sessions").mkdir(parents=True, exist_ok=True)
        (root / "prefixes").mkdir(parents=True, exist_ok=True)
        self._scan()
        self._writer = threading.Thread(target=self._write_loop, name="kv-disk-writer", daemon=True)
        self._writer.start()

    # ---- the generation thread's side -----------------------------------------------------

    def take_session(self, session: Session) -> PendingChunk | None:
        """The chunk a finished turn adds to the session's files (its arrays are taken, not yet encoded)."""
        if session.cache is None or not session.tokens:
            return None
        name = session.file_stem
        history = History(tuple(session.tokens), tuple((w.offset, w.digest) for w in session.snippet_writes))
        with self._lock:
            before = self._planned.get(name)
            cut = 0 if before is None else _divergence(before, history)
            prefix = self._shared_prefix(_mode(session), history) if cut == 0 else None
            start = prefix[1] if prefix else cut
            if start >= len(history.tokens):
                return None
            self._planned[name] = history
            self._pending[name] += 1
            generation = self._generation[name]
        job = _Job(name, b"", start, len(history.tokens), history, cut, prefix, generation=generation)
        return PendingChunk(job, cache_chunk(session.cache, start), list(history.tokens[start:]))

    def take_prefix(self, mode: str, tokens: list[int], cache: list[Any]) -> PendingChunk | None:
        """The chunk of a new shared prefix, unless it is on disk (or on its way) already."""
        name = _prefix_id(self._fingerprint(), mode, tokens)
        with self._lock:
            if name in self._prefixes:
                return None
            record = PrefixRecord(self._fingerprint(), mode, len(tokens), tokens_digest(tokens), "", 0, time.time())
            self._prefixes[name] = record  # planned: sessions may name it before it is written
            self._pending[name] += 1
        job = _Job(name, b"", 0, len(tokens), record=record)
        return PendingChunk(job, cache_chunk(cache, 0), list(tokens))

    def submit(self, pending: PendingChunk | None) -> None:
        """Encode a taken chunk and queue it for the writer; a full queue defers it to the next turn."""
        if pending is None:
            return
        job = pending.job
        job.data = encode_chunk(pending.chunk, pending.tokens, self._fingerprint())
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            self.counters.skipped_writes += 1
            self._failed(job)
            with self._lock:
                self._done(job)

    def restore(self, session: Session, new_cache: NewCache, in_memory: SharedPrefix) -> Restored | None:
        """The session's cache from disk, for as much of its history as the files hold and pass every
        check, or None; logs why it stopped early. A shared prefix the session starts with is taken
        from `in_memory` when there, else read too (and handed back, to be kept in memory)."""
        name = session.file_stem
        history = History(tuple(session.tokens), tuple((w.offset, w.digest) for w in session.snippet_writes))
        self.wait(name)  # its queued chunks hold its newest turns
        with self._files:
            chunks, reason, prefix_read = self._read_chunks(name, history, in_memory)
        length = chunks[-1].end if chunks else 0
        cache = new_cache()
        if chunks:
            fill_cache(cache, chunks)
            length = _restorable_point(cache, length, history.writes, session.safe_offset)
            for layer in cache:
                layer.trim(layer.offset - length)
        self._count_restore(name, length, len(history.tokens), reason)
        restored = History(history.tokens[:length], tuple(w for w in history.writes if w[0] < length))
        with self._lock:
            self._planned[name] = self._committed[name] = restored
            if name in self._sessions:
                self._sessions[name][0] = time.time()
        if length == 0:
            return None
        return Restored(length, cache, [w for w in session.snippet_writes if w.offset < length], prefix_read)

    def load_prefix(self, mode: str, tokens: list[int], new_cache: NewCache) -> tuple[int, list[Any]] | None:
        """The longest shared prefix of `tokens` on disk, as a cache, or None."""
        fingerprint = self._fingerprint()
        with self._lock:
            found = self._longest_prefix(fingerprint, mode, tokens, limit=len(tokens))
        if found is None:
            return None
        name, record = found
        self.wait(name)
        if not record.sha256:
            return None  # its write failed
        record.last_used = time.time()
        try:
            with self._files:
                chunk, stored = read_chunk(self._prefix_file(name), record.sha256, fingerprint)
        except KvFileError as exc:
            log.warning("shared prefix %s not used: %s", name[:12], exc)
            self.counters.fallbacks += 1
            return None
        if stored != tokens[: record.length]:
            return None
        cache = new_cache()
        fill_cache(cache, [chunk])
        self.counters.prefix_loads += 1
        return record.length, cache

    def wait(self, name: str) -> bool:
        """Wait (at most PENDING_WAIT_S) until the chunks queued for a session or prefix are written;
        False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending[name] == 0, timeout=PENDING_WAIT_S)

    def remove(self, name: str) -> bool:
        """Delete a session's files now (its queued writes are dropped); True if it had any. Raises OSError."""
        with self._files:
            with self._lock:
                self._generation[name] += 1
                self._planned.pop(name, None)
                self._committed.pop(name, None)
                self._sessions.pop(name, None)
            folder = self._session_dir(name)
            if not folder.exists():
                return False
            shutil.rmtree(folder)
            return True

    def stats(self) -> dict[str, Any]:
        """Bytes, entries and counters, for /health."""
        with self._lock:  # never held through a disk write: /health does not wait for one
            bytes_now = self._total_bytes()
            sessions, prefixes = len(self._sessions), sum(1 for r in self._prefixes.values() if r.sha256)
        counters = self.counters
        return {
            "enabled": True,
            "max_bytes": self.max_bytes,
            "bytes": bytes_now,
            "sessions": sessions,
            "prefixes": prefixes,
            "hits": counters.hits,
            "partial_hits": counters.partial_hits,
            "fallbacks": counters.fallbacks,
            "restored_tokens": counters.restored_tokens,
            "prefix_loads": counters.prefix_loads,
            "writes": counters.writes,
            "bytes_written": counters.bytes_written,
            "write_failures": counters.write_failures,
            "skipped_writes": counters.skipped_writes,
            "evictions": counters.evictions,
            "queued": self._queue.qsize(),
            "last_error": self.last_error,
        }

    def close(self, timeout: float = 30.0) -> None:
        """Write what is queued (for at most `timeout` seconds) and stop the writer."""
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            log.warning("disk cache: %d writes still queued at shutdown are dropped", self._queue.qsize())
            return
        self._writer.join(timeout)

    # ---- the writer thread -----------------------------------------------------------------

    def _write_loop(self) -> None:
        while (job := self._queue.get()) is not None:
            try:
                with self._files:
                    if job.record is not None:
                        self._write_prefix(job)
                    else:
                        self._write_session(job)
                    with self._lock:
                        self._enforce_budget(keep=job.name)
            except _Behind as exc:
                self.counters.skipped_writes += 1
                log.info("disk cache: %s written with its next turn: %s", _label(job), exc)
                self._failed(job)
            except OSError as exc:
                self.counters.write_failures += 1
                self.last_error = describe_os_error(exc)
                log.error("disk cache: could not write %s: %s", _label(job), self.last_error)
                self._failed(job)
            except Exception:  # the writer must outlive any one write
                self.counters.write_failures += 1
                log.exception("disk cache: could not write %s", _label(job))
                self._failed(job)
            finally:
                with self._lock:
                    self._done(job)

    def _write_session(self, job: _Job) -> None:
        with self._lock:
            if job.generation != self._generation[job.name]:
                return  # the session was removed after this chunk was taken
            prefix = self._prefixes.get(job.prefix[0]) if job.prefix is not None else None
        folder = self._session_dir(job.name)
        fingerprint = self._fingerprint()
        manifest = self._manifest_or_none(job.name, fingerprint)
        if manifest is None:  # none, unreadable, or another model's: its files go
            shutil.rmtree(folder, ignore_errors=True)
            manifest = Manifest(fingerprint, time.time())
        dropped = manifest.cut(job.cut)
        if job.prefix is not None:
            prefix_id, length = job.prefix
            if prefix is None or not prefix.sha256:
                raise _Behind(f"the shared prefix {prefix_id[:12]} it starts with was not written")
            manifest.chunks = [ChunkEntry(0, length, prefix=prefix_id)]
        if manifest.end != job.start:
            raise _Behind(f"its files end at token {manifest.end}, the new chunk starts at {job.start}")
        name = f"{manifest.next_file}{CHUNK_SUFFIX}"
        folder.mkdir(parents=True, exist_ok=True)
        writes = [w for w in job.history.writes if job.start <= w[0] < job.end]
        sha = write_chunk_file(folder / name, job.data)
        manifest.chunks.append(ChunkEntry(job.start, job.end, name, sha, len(job.data), writes=writes))
        manifest.next_file += 1
        manifest.last_used = time.time()
        write_manifest(folder / MANIFEST, manifest)
        for entry in dropped:
            if entry.file is not None:
                (folder / entry.file).unlink(missing_ok=True)
        with self._lock:
            self._committed[job.name] = job.history
            self._sessions[job.name] = [manifest.last_used, _own_bytes(manifest)]
        self._count_write(len(job.data))

    def _write_prefix(self, job: _Job) -> None:
        record = job.record
        record.sha256 = write_chunk_file(self._prefix_file(job.name), job.data)
        record.nbytes = len(job.data)
        write_prefix_record(self.root / "prefixes" / f"{job.name}.json", record)
        self._count_write(len(job.data))

    def _done(self, job: _Job) -> None:
        """One queued chunk fewer (the tables' lock held)."""
        self._pending[job.name] -= 1
        self._idle.notify_all()

    def _failed(self, job: _Job) -> None:
        """After a chunk that was not written: the session's next turn writes from what its files hold."""
        with self._lock:
            if job.record is not None:
                self._prefixes.pop(job.name, None)
            elif job.generation == self._generation[job.name]:
                committed = self._committed.get(job.name)
                if committed is None:
                    self._planned.pop(job.name, None)
                else:
                    self._planned[job.name] = committed
        if job.record is not None:
            self._prefix_file(job.name).unlink(missing_ok=True)

    # ---- budget ----------------------------------------------------------------------------

    def _enforce_budget(self, keep: str) -> None:
        """Delete least recently used sessions, then shared prefixes, until within the budget."""
        while self._total_bytes() > self.max_bytes:
            sessions = sorted((v[0], k) for k, v in self._sessions.items() if k != keep)
            prefixes = sorted((r.last_used, k) for k, r in self._prefixes.items() if r.sha256)
            if sessions:
                self._drop_session(sessions[0][1])
            elif prefixes:
                name = prefixes[0][1]
                self._prefixes.pop(name)
                self._prefix_file(name).unlink(missing_ok=True)
                (self.root / "prefixes" / f"{name}.json").unlink(missing_ok=True)
            elif keep in self._sessions:
                self._drop_session(keep)  # one session alone is larger than the budget
            else:
                return
            self.counters.evictions += 1

    def _drop_session(self, name: str) -> None:
        self._sessions.pop(name, None)
        self._planned.pop(name, None)
        self._committed.pop(name, None)
        shutil.rmtree(self._session_dir(name), ignore_errors=True)

    def _total_bytes(self) -> int:
        own = sum(int(v[1]) for v in self._sessions.values())
        return own + sum(r.nbytes for r in self._prefixes.values())

    # ---- reading ---------------------------------------------------------------------------

    def _read_chunks(
        self, name: str, history: History, in_memory: SharedPrefix
    ) -> tuple[list[CacheChunk], str | None, CacheChunk | None]:
        """The chunks that match the history, in order; why reading stopped before its end; the shared
        prefix, if it was read from disk."""
        fingerprint = self._fingerprint()
        try:
            manifest = read_manifest(self._session_dir(name) / MANIFEST)
        except KvFileError as exc:
            return [], str(exc), None
        if manifest.fingerprint != fingerprint:
            return [], "written for another model, adapter or KV format", None
        chunks: list[CacheChunk] = []
        prefix_read = None
        for entry in manifest.chunks:
            if entry.start >= len(history.tokens):
                break
            end = min(entry.end, len(history.tokens))
            shared = in_memory(list(history.tokens[: entry.end])) if entry.prefix is not None else None
            try:
                if shared is not None:
                    chunk, stored = cache_chunk(shared, 0), list(history.tokens[: entry.end])
                else:
                    chunk, stored = self._read_entry(name, entry, fingerprint)
            except KvFileError as exc:
                return chunks, str(exc), prefix_read
            owned = [w for w in history.writes if entry.start <= w[0] < end]
            if stored[: end - entry.start] != list(history.tokens[entry.start : end]):
                return chunks, f"chunk at token {entry.start} holds other tokens than the history", prefix_read
            if [w for w in entry.writes if w[0] < end] != owned:
                return chunks, f"chunk at token {entry.start} holds other memory writes than the history", prefix_read
            if entry.prefix is not None and shared is None and end == entry.end:
                prefix_read = chunk  # whole and checked: worth keeping in memory
            chunks.append(chunk.cut(end))
        reason = None if chunks and chunks[-1].end == len(history.tokens) else "the files end early"
        return chunks, reason, prefix_read

    def _read_entry(self, name: str, entry: ChunkEntry, fingerprint: str) -> tuple[CacheChunk, list[int]]:
        if entry.prefix is None:
            return read_chunk(self._session_dir(name) / (entry.file or ""), entry.sha256 or "", fingerprint)
        record = self._prefixes.get(entry.prefix)
        if record is None or not record.sha256:
            raise KvFileError(f"shared prefix {entry.prefix[:12]} is no longer on disk")
        record.last_used = time.time()
        self.counters.prefix_loads += 1
        return read_chunk(self._prefix_file(entry.prefix), record.sha256, fingerprint)

    def _manifest_or_none(self, name: str, fingerprint: str) -> Manifest | None:
        try:
            manifest = read_manifest(self._session_dir(name) / MANIFEST)
        except KvFileError:
            return None
        return manifest if manifest.fingerprint == fingerprint else None

    def _shared_prefix(self, mode: str, history: History) -> tuple[str, int] | None:
        """A shared prefix this history starts with, written before any memory write; (id, length)."""
        first_write = history.writes[0][0] if history.writes else len(history.tokens)
        found = self._longest_prefix(self._fingerprint(), mode, list(history.tokens), limit=first_write)
        return None if found is None else (found[0], found[1].length)

    def _longest_prefix(
        self, fingerprint: str, mode: str, tokens: list[int], limit: int
    ) -> tuple[str, PrefixRecord] | None:
        best = None
        for name, record in self._prefixes.items():
            if record.fingerprint != fingerprint or record.mode != mode or record.length > limit:
                continue
            if best is not None and record.length <= best[1].length:
                continue
            if tokens_digest(tokens[: record.length]) == record.tokens_sha256:
                best = (name, record)
        return best

    def _count_restore(self, name: str, length: int, wanted: int, reason: str | None) -> None:
        if length == wanted and wanted > 0:
            self.counters.hits += 1
        elif length > 0:
            self.counters.partial_hits += 1
        else:
            self.counters.fallbacks += 1
        self.counters.restored_tokens += length
        if length < wanted and reason is not None:
            log.info("session %s: %d of %d tokens from disk, the rest replayed: %s", name[:12], length, wanted, reason)

    def _count_write(self, nbytes: int) -> None:
        self.counters.writes += 1
        self.counters.bytes_written += nbytes

    # ---- start-up ---------------------------------------------------------------------------

    def _scan(self) -> None:
        """Read what earlier runs left: every manifest's size and age; remove what no manifest names."""
        for path in (self.root / "prefixes").iterdir():
            if path.suffix == ".json":
                try:
                    record = read_prefix_record(path)
                except KvFileError as exc:
                    log.warning("disk cache: removing shared prefix %s: %s", path.stem[:12], exc)
                    path.unlink(missing_ok=True)
                    continue
                self._prefixes[path.stem] = record
        for path in (self.root / "prefixes").iterdir():
            if path.suffix != ".json" and (path.suffix != CHUNK_SUFFIX or path.stem not in self._prefixes):
                path.unlink(missing_ok=True)  # a write a kill interrupted, or a record that went bad
        for folder in (self.root / "sessions").iterdir():
            try:
                manifest = read_manifest(folder / MANIFEST)
            except KvFileError:
                shutil.rmtree(folder, ignore_errors=True)
                continue
            named = {c.file for c in manifest.chunks if c.file}
            for path in folder.iterdir():
                if path.name != MANIFEST and path.name not in named:
                    path.unlink(missing_ok=True)
            self._sessions[folder.name] = [manifest.last_used, _own_bytes(manifest)]
        self._enforce_budget(keep="")

    def _session_dir(self, name: str) -> Path:
        return self.root / "sessions" / name

    def _prefix_file(self, name: str) -> Path:
        return self.root / "prefixes" / f"{name}{CHUNK_SUFFIX}"


def _divergence(before: History, after: History) -> int:
    """The first offset from which `after` holds other state than `before` (tokens or memory writes)."""
    point = common_prefix(list(before.tokens), list(after.tokens))
    for old, new in zip(before.writes, after.writes):
        if old != new:
            return min(point, old[0], new[0])
    longer = before.writes[len(after.writes) :] or after.writes[len(before.writes) :]
    return min(point, longer[0][0]) if longer else point


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


def _own_bytes(manifest: Manifest) -> int:
    return sum(c.nbytes for c in manifest.chunks if c.file)


def _prefix_id(fingerprint: str, mode: str, tokens: list[int]) -> str:
    """A shared prefix's file name: its tokens, mode and fingerprint hashed (never a prompt on disk)."""
    return hashlib.sha256(f"{fingerprint}|{mode}|{tokens_digest(tokens)}".encode()).hexdigest()[:32]


def _mode(session: Session) -> str:
    return "delta" if session.delta else "base"


def _label(job: _Job) -> str:
    return f"shared prefix {job.name[:12]}" if job.record is not None else f"session {job.name[:12]}"
