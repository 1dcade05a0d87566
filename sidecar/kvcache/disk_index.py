"""What the disk cache holds, in memory: each session's bytes and last use, the shared prefix records,
what each session's files hold now and will hold once its queued writes are done; and which entry
the byte budget evicts next. Every table is read and changed under one lock (`DiskIndex.lock`), held
briefly: never through a disk write or read, so taking a turn's chunk or /health never waits for one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
import time
from collections import Counter
from dataclasses import dataclass

from sidecar.kvcache.disk_files import PrefixRecord, tokens_digest
from sidecar.kvcache.disk_folders import SessionOnDisk
from sidecar.sessions.state import Session, common_prefix


@dataclass(frozen=True)
class History:
    """What a session's cache holds on disk, or will once the queued writes are done."""

    tokens: tuple[int, ...]
    writes: tuple[tuple[int, str], ...]

    def divergence(self, after: History) -> int:
        """The first offset from which `after` holds other state than this (tokens or memory writes)."""
        point = common_prefix(list(self.tokens), list(after.tokens))
        for old, new in zip(self.writes, after.writes):
            if old != new:
                return min(point, old[0], new[0])
        longer = self.writes[len(after.writes) :] or after.writes[len(self.writes) :]
        return min(point, longer[0][0]) if longer else point


def history_of(session: Session) -> History:
    """A session's history as the disk cache compares it: its tokens and memory writes."""
    return History(tuple(session.tokens), tuple((w.offset, w.digest) for w in session.snippet_writes))


def mode_of(session: Session) -> str:
    """A session's mode, as shared prefixes are keyed."""
    return "delta" if session.delta else "base"


def prefix_id_of(fingerprint: str, mode: str, tokens: list[int]) -> str:
    """A shared prefix's file name: its tokens, mode and fingerprint hashed (never a prompt on disk)."""
    return hashlib.sha256(f"{fingerprint}|{mode}|{tokens_digest(tokens)}".encode()).hexdigest()[:32]


class DiskIndex:
    """The disk cache's tables and its byte budget (callers hold `lock` around every method)."""

    def __init__(self, max_bytes: int, sessions: dict[str, SessionOnDisk], prefixes: dict[str, PrefixRecord]):
        self.max_bytes = max_bytes
        self.lock = threading.Lock()
        self.idle = threading.Condition(self.lock)  # notified when a queued write is done
        self.sessions = dict(sessions)  # written sessions: last use and bytes
        self.prefixes = dict(prefixes)  # shared prefixes, written or planned (sha256 "" until written)
        self.planned: dict[str, History] = {}  # what each session will hold once its queue drains
        self.committed: dict[str, History] = {}  # what its manifest holds now
        self.generation: Counter[str] = Counter()  # bumped when a session is removed
        self.pending: Counter[str] = Counter()  # queued writes per session or prefix

    def total_bytes(self) -> int:
        """Bytes of every session's own files and every written shared prefix."""
        return sum(s.nbytes for s in self.sessions.values()) + sum(r.nbytes for r in self.prefixes.values())

    def written_prefixes(self) -> int:
        """Shared prefixes on disk (not those still queued)."""
        return sum(1 for r in self.prefixes.values() if r.sha256)

    def touch_session(self, name: str) -> None:
        """A session was used now (least recently used ones are evicted first)."""
        if name in self.sessions:
            self.sessions[name] = dataclasses.replace(self.sessions[name], last_used=time.time())

    def touch_prefix(self, prefix_id: str) -> PrefixRecord | None:
        """A written shared prefix's record, marked as used now; None when it is not on disk."""
        record = self.prefixes.get(prefix_id)
        if record is None or not record.sha256:
            return None
        record.last_used = time.time()
        return dataclasses.replace(record)

    def forget_session(self, name: str) -> None:
        """A session whose files are gone (removed or evicted): its queued writes are dropped."""
        self.generation[name] += 1
        self.sessions.pop(name, None)
        self.planned.pop(name, None)
        self.committed.pop(name, None)

    def longest_prefix(
        self, fingerprint: str, mode: str, tokens: list[int], limit: int
    ) -> tuple[str, PrefixRecord] | None:
        """The longest shared prefix (written or planned) that `tokens` start with, of at most `limit` tokens."""
        best = None
        for prefix_id, record in self.prefixes.items():
            if record.fingerprint != fingerprint or record.mode != mode or record.length > limit:
                continue
            if best is not None and record.length <= best[1].length:
                continue
            if tokens_digest(tokens[: record.length]) == record.tokens_sha256:
                best = (prefix_id, record)
        return best

    def next_eviction(self, keep: str) -> tuple[str, str] | None:
        """What to delete next while over the budget: ("session" or "prefix", name), least recently used
        first, sessions before shared prefixes, `keep` last; None when within the budget."""
        if self.total_bytes() <= self.max_bytes:
            return None
        sessions = sorted((s.last_used, name) for name, s in self.sessions.items() if name != keep)
        prefixes = sorted((r.last_used, name) for name, r in self.prefixes.items() if r.sha256)
        if sessions:
            return "session", sessions[0][1]
        if prefixes:
            return "prefix", prefixes[0][1]
        if keep in self.sessions:
            return "session", keep  # one session alone is larger than the budget
        return None
