"""The session store: sessions in memory under LRU bounds, saved to disk after every turn."""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidecar.sessions.files import SessionFileError, load_session_file, save_session_file
from sidecar.sessions.fingerprint import SessionFingerprint
from sidecar.sessions.state import MODES, Session, file_stem, mode_name

log = logging.getLogger("sidecar.sessions.store")


class StateWriteError(Exception):
    """A session file that could not be written or removed; the message is safe to show the client."""

    def __init__(self, what: str, exc: OSError) -> None:
        super().__init__(f"could not {what}: {describe_os_error(exc)}")


def describe_os_error(exc: OSError) -> str:
    """What went wrong with a file in words a user acts on (no file name: names are key hashes)."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "the disk is full"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied on the state dir"
    if exc.errno == errno.EROFS:
        return "the state dir is on a read-only file system"
    return exc.strerror or type(exc).__name__


@dataclass
class SaveRecord:
    """How saving session files went: counts and the latest failure, for /health."""

    saved: int = 0
    failed: int = 0
    failing: bool = False  # the latest save failed
    last_error: str | None = None

    def problems(self) -> list[str]:
        """A line for /health while saving fails; empty once a save works again."""
        if not self.failing:
            return []
        return [f"sessions cannot be saved: {self.last_error} ({self.failed} failed saves so far)"]


class SessionStore:
    """Sessions in memory, least recently used first out, bounded by count and by KV bytes.

    Every session is saved to `state_dir` after each turn (atomic write, hashed file name), so an
    evicted session, or every session after a restart, comes back from disk with its history. A
    session whose latest save failed keeps its history in memory when evicted (only its KV goes),
    so that a full disk never turns an eviction into lost turns.
    """

    def __init__(
        self, max_sessions: int, max_kv_bytes: int, state_dir: Path | None, fingerprint: SessionFingerprint | None
    ):
        self.max_sessions = max_sessions
        self.max_kv_bytes = max_kv_bytes
        self.state_dir = state_dir
        self.fingerprint = fingerprint
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._unsaved: set[str] = set()  # file stems whose latest save failed
        self._evicted_unsaved: dict[str, Session] = {}  # their histories, once evicted (no KV)
        # The worker changes the store; /health reads it from the event loop thread.
        self._lock = threading.Lock()
        self.evictions = 0
        self.saves = SaveRecord()
        if state_dir is not None:
            state_dir.mkdir(parents=True, exist_ok=True)
            _remove_leftovers(state_dir)

    def __len__(self) -> int:
        return len(self._sessions)

    @property
    def kv_bytes(self) -> int:
        """Bytes of KV (and δ-states) held by sessions in memory."""
        return sum(s.kv_bytes for s in self._sessions.values())

    def get(self, key_hash: str, delta: bool) -> Session:
        """The session for a key and mode: in memory, else from disk, else new."""
        stem = file_stem(key_hash, delta)
        session = self._sessions.get(stem) or self._evicted_unsaved.pop(stem, None)
        if session is None:
            session = self._from_disk(key_hash, delta) or Session(key_hash, delta)
        with self._lock:
            self._sessions[stem] = session
            self._sessions.move_to_end(stem)
        session.last_used = time.time()
        return session

    def peek(self, key_hash: str, delta: bool) -> Session | None:
        """The session if it is in memory or on disk, without creating one."""
        stem = file_stem(key_hash, delta)
        return self._sessions.get(stem) or self._evicted_unsaved.get(stem) or self._from_disk(key_hash, delta)

    def peek_modes(self, key_hash: str) -> list[Session]:
        """The key's sessions (δ first) that are in memory or on disk, without creating any."""
        return [s for s in (self.peek(key_hash, delta) for delta in MODES) if s is not None]

    def save(self, session: Session, states: list[Any] | None, checkpoints: dict[int, list[Any]]) -> Path | None:
        """Write the session's history (and its current and checkpoint δ-states) to disk, atomically.

        Raises StateWriteError (and counts the failure) when the file cannot be written.
        """
        path = self._path(session.file_stem)
        if path is None:
            return None
        try:
            save_session_file(path, session, self._fingerprint().current, states, checkpoints)
        except OSError as exc:
            error = StateWriteError(f"save the session's {session.mode} state", exc)
            self.saves.failed += 1
            self.saves.failing = True
            self.saves.last_error = str(error)
            self._unsaved.add(session.file_stem)
            raise error from exc
        self.saves.saved += 1
        self.saves.failing = False
        self._unsaved.discard(session.file_stem)
        self._evicted_unsaved.pop(session.file_stem, None)
        return path

    def remove(self, key_hash: str) -> bool:
        """Forget a key in both modes, on disk and in memory; True if anything existed.

        Each mode's file goes first: if it cannot be removed, StateWriteError is raised and that
        mode is kept in memory, so the state on disk never outlives newer state in memory.
        """
        found = False
        for delta in MODES:
            stem = file_stem(key_hash, delta)
            path = self._path(stem)
            if path is not None:
                try:
                    path.unlink()
                    found = True
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    what = f"remove the session's {mode_name(delta)} file, so it was not reset"
                    raise StateWriteError(what, exc) from exc
            with self._lock:
                found |= self._sessions.pop(stem, None) is not None
            found |= self._evicted_unsaved.pop(stem, None) is not None
            self._unsaved.discard(stem)
        return found

    def enforce_limits(self, keep: Collection[str] = (), reserved_bytes: int = 0) -> None:
        """Drop least recently used sessions until within bounds (counting `reserved_bytes` held
        elsewhere); the sessions whose key hashes are in `keep` (those answering now) stay."""
        for stem in list(self._sessions):
            over_count = len(self._sessions) > self.max_sessions
            over_bytes = self.kv_bytes + reserved_bytes > self.max_kv_bytes
            if not (over_count or over_bytes):
                break
            if self._sessions[stem].key_hash not in keep:
                self.evict(stem, "count" if over_count else "kv bytes")

    def evict(self, stem: str, reason: str) -> None:
        """Drop a session's cache from memory (its history stays on disk and rebuilds it)."""
        with self._lock:
            session = self._sessions.pop(stem, None)
        if session is not None:
            session.drop_cache()
            if stem in self._unsaved:
                self._evicted_unsaved[stem] = session
            self.evictions += 1
            log.info("evicted session %s (%s)", session.key_hash[:12], reason)

    def sessions(self) -> list[Session]:
        """Sessions in memory, least recently used first."""
        with self._lock:
            return list(self._sessions.values())

    def evicted_unsaved(self) -> list[Session]:
        """Evicted sessions whose latest state is not on disk yet (their history only)."""
        return list(self._evicted_unsaved.values())

    def save_report(self) -> dict[str, Any]:
        """Saving figures for /health: counts, the latest failure, sessions not on disk."""
        saves = self.saves
        return {
            "saves": saves.saved,
            "save_failures": saves.failed,
            "last_save_error": saves.last_error,
            "unsaved": len(self._unsaved),
        }

    def persisted_count(self) -> int:
        """How many session files the state dir holds."""
        if self.state_dir is None:
            return 0
        return sum(1 for _ in self.state_dir.glob("*.session.npz"))

    def _fingerprint(self) -> SessionFingerprint:
        if self.fingerprint is None:
            raise RuntimeError("a store with a state dir needs the fingerprint of what it serves")
        return self.fingerprint

    def _path(self, stem: str) -> Path | None:
        return None if self.state_dir is None else self.state_dir / f"{stem}.session.npz"

    def _from_disk(self, key_hash: str, delta: bool) -> Session | None:
        path = self._path(file_stem(key_hash, delta))
        if path is None or not path.exists():
            return None
        try:
            fingerprint = self._fingerprint()
            return load_session_file(path, fingerprint.current, fingerprint.legacy)
        except SessionFileError as exc:
            log.warning("ignoring session file %s: %s", path.name, exc)
            return None


def _remove_leftovers(state_dir: Path) -> None:
    # A process killed in the middle of an atomic write leaves its temporary file behind. One that
    # cannot be removed is only clutter: it must not stop the server from starting.
    for leftover in state_dir.glob(".*.session.npz.*.tmp"):
        try:
            leftover.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("cannot remove the leftover temporary file %s: %s", leftover.name, describe_os_error(exc))
