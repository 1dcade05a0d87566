"""The disk cache's writer: two threads that encode and write queued chunks (a session's new chunk, or
a shared prefix), then keep the disk within its byte budget.

A turn adds one chunk to its session: the tokens from where the session last diverged from what is
on disk (the manifest is cut there) to its end. The generation thread only takes the chunk's arrays
and makes them concrete (slices of buffers the turn evaluated: no byte is copied); the encoder thread
copies them into safetensors bytes at once, and the writer thread writes the file, then the
manifest, then removes the chunks cut away, so a kill at any moment leaves the old manifest or the
new one, both whole. The encoder lets go of the arrays as soon as it has copied them, not after the
file is written: while anything else holds a slice of a session's K/V buffer, MLX cannot update that
buffer in place and copies all of it at the session's next step. Writes never hold up an answer:
at most QUEUE_LENGTH chunks wait (to be encoded or written), and a turn that finds no room is written
with the next one. A write that fails is counted, and /health lists it as a problem until a later
write works.
"""

from __future__ import annotations

import errno
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.counters import Counters
from sidecar.delta.cache_chunks import CacheChunk, cache_chunk
from sidecar.kvcache import disk_files
from sidecar.kvcache.disk_files import (
    CHUNK_SUFFIX,
    MANIFEST,
    ChunkEntry,
    HostChunk,
    KvFileError,
    Manifest,
    PrefixRecord,
    chunk_on_host,
    read_manifest,
    tokens_digest,
    write_manifest,
    write_prefix_record,
)
from sidecar.kvcache.disk_folders import DiskLayout, SessionOnDisk, is_real_dir, remove_prefix, remove_session_folder
from sidecar.kvcache.disk_index import DiskIndex, History, history_of, mode_of, prefix_id_of
from sidecar.sessions.state import Session
from sidecar.sessions.store import describe_os_error

log = logging.getLogger("sidecar.kvcache.disk_cache")

QUEUE_LENGTH = 8


@dataclass
class DiskCounters(Counters):
    """What /health reports about the disk cache (changed from several threads: only through `add`)."""

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
    read_failures: int = 0  # reads that failed for a reason other than a file's content (replayed)
    stalled_reads: int = 0  # reads that did not return within their deadline (replayed)


@dataclass
class DiskWrite:
    """One write for the writer thread: a session's new chunk, or a shared prefix."""

    name: str  # session folder or prefix id
    start: int
    end: int
    history: History | None = None  # sessions: the history once written
    cut: int = 0  # sessions: where the manifest is cut before the chunk is added
    prefix: tuple[str, int] | None = None  # sessions: a shared prefix as the first chunk
    record: PrefixRecord | None = None  # prefixes
    generation: int = 0
    data: bytes | bytearray = b""

    def label(self) -> str:
        """What the log calls it."""
        return f"shared prefix {self.name[:12]}" if self.record is not None else f"session {self.name[:12]}"


@dataclass
class PendingChunk:
    """A chunk taken on the generation thread, handed to the encoder (`queue_write`) once the answer has ended."""

    write: DiskWrite
    chunk: CacheChunk
    tokens: list[int]


@dataclass
class HostWrite:
    """A write whose chunk is on the host, for the encoder thread."""

    write: DiskWrite
    chunk: HostChunk
    tokens: list[int]


class _Behind(Exception):
    """A chunk that cannot go on its session's files: an earlier write failed, so it would leave a gap."""


class ChunkEncoder:
    """The encoder thread: turns each queued chunk into safetensors bytes as soon as it arrives (no MLX
    call: numpy reads MLX's buffers), lets go of its arrays, then hands the write on with `deliver`
    (None once closed, after the last chunk)."""

    def __init__(
        self, fingerprint: Callable[[], str], deliver: Callable[[DiskWrite | None], None],
        on_failure: Callable[[DiskWrite, str], None],
    ):  # fmt: skip
        self._fingerprint = fingerprint
        self._deliver = deliver
        self._on_failure = on_failure
        self._queue: queue.Queue[HostWrite | None] = queue.Queue()  # bounded by the writer's slots
        self._thread = threading.Thread(target=self._loop, name="kv-disk-encoder", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        """Chunks waiting to be encoded."""
        return self._queue.qsize()

    def put(self, taken: HostWrite | None) -> None:
        """Queue a chunk to encode; None: encode what is queued, then stop."""
        self._queue.put(taken)

    def _loop(self) -> None:
        while (taken := self._queue.get()) is not None:
            write = taken.write
            try:
                write.data = disk_files.encode_chunk(taken.chunk, taken.tokens, self._fingerprint())
            except Exception as exc:  # the encoder must outlive any one chunk
                log.exception("disk cache: could not encode %s", write.label())
                self._on_failure(write, f"{type(exc).__name__}: {exc}")
                continue
            finally:
                # The last reference to sessions' K/V buffers: none is held while the file is written.
                del taken
            self._deliver(write)
        self._deliver(None)


class DiskWriter:
    """The encoder and writer threads, their bounded queues, and the budget enforced after every write."""

    def __init__(self, layout: DiskLayout, index: DiskIndex, counters: DiskCounters, fingerprint: Callable[[], str]):
        self.layout = layout
        self.index = index
        self.counters = counters
        self._fingerprint = fingerprint
        # Held through every change of files (a write and its evictions, a removal), never by a reader.
        self.files = threading.Lock()
        self.last_error: str | None = None
        self.failing = False  # the latest write failed
        # A chunk takes a slot when queued and gives it back once the writer takes it up: the room
        # is decided on the generation thread, so a session's next chunk knows if this one was skipped.
        self._slots = threading.BoundedSemaphore(QUEUE_LENGTH)
        self._queue: queue.Queue[DiskWrite | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="kv-disk-writer", daemon=True)
        self._thread.start()
        self._encoder = ChunkEncoder(fingerprint, self._queue.put, self._encode_failed)

    @property
    def queued(self) -> int:
        """Writes waiting in the queues (to be encoded, to be written)."""
        return self._encoder.queued + self._queue.qsize()

    def take_session(self, session: Session) -> PendingChunk | None:
        """The chunk a finished turn adds to the session's files (its arrays are taken, not yet encoded)."""
        if session.cache is None or not session.tokens:
            return None
        name = session.file_stem
        history = history_of(session)
        with self.index.lock:
            before = self.index.planned.get(name)
            cut = 0 if before is None else before.divergence(history)
            prefix = self._shared_prefix(mode_of(session), history) if cut == 0 else None
            start = prefix[1] if prefix else cut
            if start >= len(history.tokens):
                return None
            self.index.planned[name] = history
            self.index.pending[name] += 1
            generation = self.index.generation[name]
        write = DiskWrite(name, start, len(history.tokens), history, cut, prefix, generation=generation)
        return PendingChunk(write, cache_chunk(session.cache, start), list(history.tokens[start:]))

    def take_prefix(self, mode: str, tokens: list[int], cache: list[Any]) -> PendingChunk | None:
        """The chunk of a new shared prefix, unless it is on disk (or on its way) already."""
        fingerprint = self._fingerprint()
        prefix_id = prefix_id_of(fingerprint, mode, tokens)
        with self.index.lock:
            if prefix_id in self.index.prefixes:
                return None
            record = PrefixRecord(fingerprint, mode, len(tokens), tokens_digest(tokens), "", 0, time.time())
            self.index.prefixes[prefix_id] = record  # planned: sessions may name it before it is written
            self.index.pending[prefix_id] += 1
        write = DiskWrite(prefix_id, 0, len(tokens), record=record)
        return PendingChunk(write, cache_chunk(cache, 0), list(tokens))

    def queue_write(self, pending: PendingChunk | None) -> None:
        """Make a taken chunk's arrays concrete (on the generation thread, no byte copied) and queue it for
        the encoder; when QUEUE_LENGTH chunks wait already, it is written with the session's next turn."""
        if pending is None:
            return
        taken = HostWrite(pending.write, chunk_on_host(pending.chunk), pending.tokens)
        if self._slots.acquire(blocking=False):
            self._encoder.put(taken)
            return
        self.counters.add(skipped_writes=1)
        self._failed(pending.write)
        self._done(pending.write)

    def wait(self, name: str, timeout: float) -> bool:
        """Wait (at most `timeout` seconds) until the writes queued for a session or prefix are done;
        False on timeout."""
        with self.index.idle:
            return self.index.idle.wait_for(lambda: self.index.pending[name] == 0, timeout=timeout)

    def remove(self, name: str) -> bool:
        """Delete a session's files now (its queued writes are dropped); True if it had any. Raises OSError."""
        with self.files:
            with self.index.lock:
                self.index.forget_session(name)
            folder = self.layout.session_dir(name)
            if not folder.exists() and not folder.is_symlink():
                return False
            remove_session_folder(folder)
            return True

    def restored(self, name: str, history: History) -> None:
        """A session was read back from disk up to `history` (its next chunk starts where that ends)."""
        with self.index.lock:
            self.index.planned[name] = self.index.committed[name] = history
            self.index.touch_session(name)

    def close(self, timeout: float) -> None:
        """Encode and write what is queued (for at most `timeout` seconds) and stop the threads."""
        self._encoder.put(None)  # the encoder hands the writer its last chunk, then None
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("disk cache: %d writes still queued at shutdown are dropped", self.queued)

    # ---- the writer thread -----------------------------------------------------------------

    def _encode_failed(self, write: DiskWrite, error: str) -> None:
        self._slots.release()
        self._count_failure(write, error)
        self._done(write)

    def _loop(self) -> None:
        while (write := self._queue.get()) is not None:
            self._slots.release()
            try:
                with self.files:
                    if write.record is not None:
                        self._write_prefix(write)
                    else:
                        self._write_session(write)
                    self._evict(keep=write.name)
                self.failing = False
            except _Behind as exc:
                self.counters.add(skipped_writes=1)
                log.info("disk cache: %s written with its next turn: %s", write.label(), exc)
                self._failed(write)
            except OSError as exc:
                self._count_failure(write, describe_os_error(exc))
            except Exception as exc:  # the writer must outlive any one write
                log.exception("disk cache: could not write %s", write.label())
                self._count_failure(write, f"{type(exc).__name__}: {exc}")
            finally:
                self._done(write)

    def _count_failure(self, write: DiskWrite, error: str) -> None:
        self.counters.add(write_failures=1)
        self.last_error, self.failing = error, True
        log.error("disk cache: could not write %s: %s", write.label(), error)
        self._failed(write)

    def _write_session(self, write: DiskWrite) -> None:
        assert write.history is not None
        with self.index.lock:
            if write.generation != self.index.generation[write.name]:
                return  # the session was removed after this chunk was taken
            prefix = self.index.prefixes.get(write.prefix[0]) if write.prefix is not None else None
        folder = self.layout.session_dir(write.name)
        if folder.is_symlink() or (folder.exists() and not is_real_dir(folder)):
            raise OSError(errno.ELOOP, f"{folder.name} is not a folder of the disk cache (a symbolic link?)")
        fingerprint = self._fingerprint()
        manifest = self._manifest_or_none(folder, fingerprint)
        if manifest is None:  # none, unreadable, or another model's: its files go
            remove_session_folder(folder)
            manifest = Manifest(fingerprint, time.time())
        dropped = manifest.cut(write.cut)
        if write.prefix is not None:
            prefix_id, length = write.prefix
            if prefix is None or not prefix.sha256:
                raise _Behind(f"the shared prefix {prefix_id[:12]} it starts with was not written")
            manifest.chunks = [ChunkEntry(0, length, prefix=prefix_id)]
        if manifest.end != write.start:
            raise _Behind(f"its files end at token {manifest.end}, the new chunk starts at {write.start}")
        name = f"{manifest.next_file}{CHUNK_SUFFIX}"
        folder.mkdir(parents=True, exist_ok=True)
        writes = [w for w in write.history.writes if write.start <= w[0] < write.end]
        sha = disk_files.write_chunk_file(folder / name, write.data)
        manifest.chunks.append(ChunkEntry(write.start, write.end, name, sha, len(write.data), writes=writes))
        manifest.next_file += 1
        manifest.last_used = time.time()
        write_manifest(folder / MANIFEST, manifest)
        for entry in dropped:
            if entry.file is not None:
                (folder / entry.file).unlink(missing_ok=True)
        own = sum(c.nbytes for c in manifest.chunks if c.file)
        with self.index.lock:
            self.index.committed[write.name] = write.history
            self.index.sessions[write.name] = SessionOnDisk(manifest.last_used, own)
        self.counters.add(writes=1, bytes_written=len(write.data))

    def _write_prefix(self, write: DiskWrite) -> None:
        assert write.record is not None
        sha = disk_files.write_chunk_file(self.layout.prefix_file(write.name), write.data)
        record = PrefixRecord(**{**vars(write.record), "sha256": sha, "nbytes": len(write.data)})
        write_prefix_record(self.layout.prefix_record(write.name), record)
        with self.index.lock:
            self.index.prefixes[write.name] = record
        self.counters.add(writes=1, bytes_written=len(write.data))

    def _manifest_or_none(self, folder: Path, fingerprint: str) -> Manifest | None:
        try:
            manifest = read_manifest(folder / MANIFEST)
        except KvFileError:
            return None
        return manifest if manifest.fingerprint == fingerprint else None

    def _done(self, write: DiskWrite) -> None:
        """One queued write fewer."""
        with self.index.lock:
            self.index.pending[write.name] -= 1
            self.index.idle.notify_all()

    def _failed(self, write: DiskWrite) -> None:
        """After a chunk that was not written: the session's next turn writes from what its files hold."""
        with self.index.lock:
            if write.record is not None:
                self.index.prefixes.pop(write.name, None)
            elif write.generation == self.index.generation[write.name]:
                committed = self.index.committed.get(write.name)
                if committed is None:
                    self.index.planned.pop(write.name, None)
                else:
                    self.index.planned[write.name] = committed
        if write.record is not None:
            try:
                remove_prefix(self.layout, write.name)
            except OSError as exc:
                log.warning("disk cache: cannot remove shared prefix %s: %s", write.name[:12], describe_os_error(exc))

    def _shared_prefix(self, mode: str, history: History) -> tuple[str, int] | None:
        """A shared prefix this history starts with, written before any memory write; (id, length)."""
        first_write = history.writes[0][0] if history.writes else len(history.tokens)
        found = self.index.longest_prefix(self._fingerprint(), mode, list(history.tokens), limit=first_write)
        return None if found is None else (found[0], found[1].length)

    def enforce_budget(self, keep: str) -> None:
        """Delete least recently used sessions, then shared prefixes, until within the budget."""
        with self.files:
            self._evict(keep)

    def _evict(self, keep: str) -> None:
        """enforce_budget, the files' lock held."""
        while True:
            with self.index.lock:
                victim = self.index.next_eviction(keep)
                if victim is None:
                    return
                kind, name = victim
                if kind == "session":
                    self.index.forget_session(name)
                else:
                    self.index.prefixes.pop(name)
            if kind == "session":
                remove_session_folder(self.layout.session_dir(name))
            else:
                remove_prefix(self.layout, name)
            self.counters.add(evictions=1)
