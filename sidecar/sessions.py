"""The session store: sessions in memory under LRU bounds, saved to disk after every turn."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Collection
from pathlib import Path
from typing import Any

from sidecar.session_files import SessionFileError, load_session_file, save_session_file
from sidecar.session_state import Session

log = logging.getLogger("sidecar.sessions")

class SessionStore:
    """Sessions in memory, least recently used first out, bounded by count and by KV bytes.

    Every session is saved to `state_dir` after each turn (atomic write, hashed file name), so an
    evicted session, or every session after a restart, comes back from disk with its history.
    """

    def __init__(self, max_sessions: int, max_kv_bytes: int, state_dir: Path | None, fingerprint: str):
        self.max_sessions = max_sessions
        self.max_kv_bytes = max_kv_bytes
        self.state_dir = state_dir
        self.fingerprint = fingerprint
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        # The worker changes the store; /health reads it from the event loop thread.
        self._lock = threading.Lock()
        self.evictions = 0
        if state_dir is not None:
            state_dir.mkdir(parents=True, exist_ok=True)
            # A process killed in the middle of an atomic write leaves its temporary file behind.
            for leftover in state_dir.glob(".*.session.npz.*.tmp"):
                leftover.unlink(missing_ok=True)

    def __len__(self) -> int:
        return len(self._sessions)

    @property
    def kv_bytes(self) -> int:
        """Bytes of KV (and δ-states) held by sessions in memory."""
        return sum(s.kv_bytes for s in self._sessions.values())

    def get(self, key_hash: str, delta: bool) -> Session:
        """The session for a key and mode: in memory, else from disk, else new."""
        stem = Session(key_hash, delta).file_stem
        session = self._sessions.get(stem)
        if session is None:
            session = self._from_disk(key_hash, delta) or Session(key_hash, delta)
        with self._lock:
            self._sessions[stem] = session
            self._sessions.move_to_end(stem)
        session.last_used = time.time()
        return session

    def peek(self, key_hash: str, delta: bool) -> Session | None:
        """The session if it is in memory or on disk, without creating one."""
        stem = Session(key_hash, delta).file_stem
        return self._sessions.get(stem) or self._from_disk(key_hash, delta)

    def save(self, session: Session, states: list[Any] | None) -> Path | None:
        """Write the session's history (and its current δ-states) to disk, atomically."""
        path = self._path(session.file_stem)
        if path is None:
            return None
        save_session_file(path, session, self.fingerprint, states)
        return path

    def remove(self, key_hash: str) -> bool:
        """Forget a key in both modes, in memory and on disk; True if anything existed."""
        found = False
        for delta in (True, False):
            stem = Session(key_hash, delta).file_stem
            with self._lock:
                found |= self._sessions.pop(stem, None) is not None
            path = self._path(stem)
            if path is not None and path.exists():
                path.unlink()
                found = True
        return found

    def enforce_limits(self, keep: Collection[str] = (), reserved_bytes: int = 0) -> list[Session]:
        """Drop least recently used sessions until within bounds (counting `reserved_bytes` held
        elsewhere); the sessions whose key hashes are in `keep` (those answering now) stay."""
        dropped: list[Session] = []
        for stem in list(self._sessions):
            over_count = len(self._sessions) > self.max_sessions
            over_bytes = self.kv_bytes + reserved_bytes > self.max_kv_bytes
            if not (over_count or over_bytes):
                break
            session = self._sessions[stem]
            if session.key_hash in keep:
                continue
            with self._lock:
                del self._sessions[stem]
            session.cache = None
            dropped.append(session)
            self.evictions += 1
            log.info("evicted session %s (%s)", session.key_hash[:12], "count" if over_count else "kv bytes")
        return dropped

    def sessions(self) -> list[Session]:
        """Sessions in memory, least recently used first."""
        with self._lock:
            return list(self._sessions.values())

    def persisted_count(self) -> int:
        """How many session files the state dir holds."""
        if self.state_dir is None:
            return 0
        return sum(1 for _ in self.state_dir.glob("*.session.npz"))

    def _path(self, stem: str) -> Path | None:
        return None if self.state_dir is None else self.state_dir / f"{stem}.session.npz"

    def _from_disk(self, key_hash: str, delta: bool) -> Session | None:
        path = self._path(Session(key_hash, delta).file_stem)
        if path is None or not path.exists():
            return None
        try:
            return load_session_file(path, self.fingerprint)
        except SessionFileError as exc:
            log.warning("ignoring session file %s: %s", path.name, exc)
            return None
