"""The one place that keeps the caches within the KV budget: room is made before a step, never after.

Before a prefill, room for the whole request (and a new shared-prefix snapshot); before every
prefill and decode step, room for what the step adds; after an answer, the byte and count bounds.
Idle sessions go first (least recently used first), then shared prefixes; the sessions answering
now are never evicted.

A session that starts from a shared prefix references its K/V (sidecar/delta/shared_prefix.py): its
own bytes are the tokens after the prefix and its δ record, and the prefix is counted once, however
many sessions reference it and whether or not the prefix cache still lists it. Evicting a session
frees the prefix only when nothing else references it; a prefix cache entry that a resident session
references frees nothing, so it is never evicted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable
from dataclasses import replace
from typing import Any

import mlx.core as mx

from common.kv_budget import kv_bits_name
from common.settings import SidecarSettings
from sidecar.delta.api import delta_record_nbytes
from sidecar.delta.shared_prefix import SharedPrefix, shared_prefix_of
from sidecar.engine.failures import JobCounters
from sidecar.engine.memory_guard import (
    Holding,
    KvBudgetExceeded,
    KvGuard,
    KvHoldings,
    RequestSize,
    answering_bytes,
    eviction_plan,
)
from sidecar.kvcache.prefix_cache import PrefixCache
from sidecar.sessions.state import Session
from sidecar.sessions.store import SessionStore

log = logging.getLogger(__name__)


class MemoryKeeper:
    """Evicts idle sessions and shared prefixes so that what runs fits the KV budget."""

    def __init__(
        self,
        guard: KvGuard,
        store: SessionStore,
        prefixes: PrefixCache,
        settings: SidecarSettings,
        counters: JobCounters,
        rooms: Callable[[], dict[str, int]],
        grow_room: Callable[[str, int], None],
    ) -> None:
        self.guard = guard
        self.store = store
        self.prefixes = prefixes
        self.settings = settings
        self.counters = counters
        self._rooms = rooms  # the sessions answering now: each one's KV room, as admitted (or grown since)
        self._grow_room = grow_room  # raises an answering session's room when it will hold more

    # ---- what a request needs ----------------------------------------------------------------

    def request_size(
        self, session: Session | None, tokens: int, messages: int, kept: int, stored: SharedPrefix | None, snapshot: int
    ) -> RequestSize:
        """The size of a request of `tokens` tokens: from the shared prefix its cache references when the
        cut back to `kept` tokens keeps it (else a private copy); with no cache (a new or evicted
        session), from `stored`, the prefix of its prompt in memory, or else the snapshot of `snapshot`
        tokens it brings in: either is the prefix it will reference when sessions share prefixes."""
        if session is not None and session.cache is not None:
            own = shared_prefix_of(session.cache) if self.prefixes.share else None
            if own is None or kept >= own.length:
                return self._size(tokens, messages, own, snapshot, session)
            return RequestSize(tokens, messages, snapshot=snapshot, unaligned=True)  # unshared: grows by the prefix
        # A session with a history and no cache may come back from disk (buffers not whole steps).
        unaligned = session is not None and bool(session.tokens)
        if not self.prefixes.share:
            return RequestSize(tokens, messages, snapshot=snapshot, unaligned=unaligned)
        if stored is None:
            return RequestSize(tokens, messages, shared=snapshot, snapshot=snapshot, unaligned=unaligned)
        return replace(self._size(tokens, messages, stored, snapshot), unaligned=unaligned)

    def size_of(self, session: Session, tokens: int, messages: int) -> RequestSize:
        """The size of `session` grown to `tokens` tokens from the cache it holds now."""
        return self._size(tokens, messages, shared_prefix_of(session.cache) if session.cache else None, 0, session)

    def needed(self, size: RequestSize) -> int:
        """Bytes a request will hold itself (its own tokens, and a prefix snapshot it brings in)."""
        return self.guard.request_bytes(size)

    def shared_room(self, size: RequestSize, busy: Collection[str]) -> int:
        """Bytes of the shared prefixes a request and the sessions answering now (`busy`) reference, each once."""
        held = {id(p): p for p in self._referenced(s for s in self.store.sessions() if s.key_hash in busy)}
        if size.prefix is not None:
            held[id(size.prefix)] = size.prefix
        return sum(p.nbytes for p in held.values())

    def resident(self, key_hash: str, delta: bool) -> Session | None:
        """The session of this key and mode if it is in memory (never read from disk)."""
        return next((s for s in self.store.sessions() if s.key_hash == key_hash and s.delta == delta), None)

    # ---- making room ----------------------------------------------------------------------------

    def reserve(self, session: Session, size: RequestSize) -> None:
        """Make room for `session` to hold a request of `size` beside the sessions answering now; raise
        KvBudgetExceeded when it cannot fit even alone (with the prefix it references)."""
        needed = self.needed(size)
        if needed + size.prefix_bytes > self.guard.budget:
            raise KvBudgetExceeded(needed + size.prefix_bytes, self.guard.budget, size.tokens)
        self._grow_room(session.key_hash, needed)
        self.make_room(needed, growing=session, pinned=size.prefix)

    def make_room_to_grow(self, growth: Iterable[tuple[Session, int]]) -> None:
        """Make room for each session to take `added` more tokens, for each (session, added).
        Called before every step even when nothing grows: a shared prefix read in since the last
        step (from disk, or a new snapshot) is idle and goes again if it does not fit."""
        grow = self.guard.growth
        self.make_room(sum(grow(len(s.tokens), added, _shared_tokens(s)) for s, added in growth))

    def make_room(self, needed: int, growing: Session | None = None, pinned: Any = None) -> None:
        """Evict idle sessions (least recently used first), then shared prefixes no session references,
        until `needed` bytes fit in the budget beside the caches of the sessions answering now
        (`growing`'s own cache is part of `needed`; `pinned`: a prefix it is about to reference) and the
        prefixes they reference; each answering session counts for the room its job was admitted with, so
        that idle holdings never take what it will grow into. Answering sessions are never evicted: when
        they hold the rest, every idle holding goes and the step runs (a failed allocation then fails
        its requests, not the server)."""
        self._evict(eviction_plan(needed, self.guard.budget, self._holdings(self._rooms(), growing, pinned)))

    def enforce_limits(self) -> None:
        """Sessions and shared prefixes together stay within the KV byte bound (sessions go first), and
        sessions within the count bound; the sessions answering now keep their caches."""
        keep = frozenset(self._rooms())
        holdings = self._holdings({key: 0 for key in keep})  # what they hold now, not their rooms
        self._evict(eviction_plan(0, self.store.max_kv_bytes, holdings))
        self.store.enforce_limits(keep=keep, reserved_bytes=self.shared_bytes())

    def after_allocation_failure(self, key_hash: str, exc: BaseException) -> None:
        """Drop the caches a failed allocation may have left half-written, and MLX's free buffers."""
        self.counters.add(allocation_failures=1)
        log.error("out of memory while answering session %s: %s", key_hash[:12], exc)
        for session in self.store.peek_modes(key_hash):
            session.drop_cache()
        mx.clear_cache()

    # ---- what is held ---------------------------------------------------------------------------

    def shared_prefixes(self) -> dict[int, SharedPrefix]:
        """Every shared prefix held: referenced by a resident session or listed by the prefix cache."""
        held = {id(p): p for p in self._referenced(self.store.sessions())}
        for key, _ in self.prefixes.entries():
            prefix = self.prefixes.shared_prefix(key)
            held[id(prefix)] = prefix
        return held

    def prefixes_in_use(self) -> frozenset[int]:
        """The shared prefixes (their ids) that resident sessions reference: the prefix cache keeps them."""
        return frozenset(id(p) for p in self._referenced(self.store.sessions()))

    def shared_bytes(self) -> int:
        """Bytes of every shared prefix held, each once."""
        return sum(p.nbytes for p in self.shared_prefixes().values())

    def held_bytes(self) -> int:
        """KV bytes held in all: every resident session's own, and each shared prefix once."""
        return self.store.kv_bytes + self.shared_bytes()

    def report(self, sessions: list[Session]) -> dict[str, Any]:
        """The budget and what holds it, for /health."""
        with_kv = [s for s in sessions if s.cache is not None]
        prefixes = self.shared_prefixes()
        listed = {id(self.prefixes.shared_prefix(key)) for key, _ in self.prefixes.entries()}
        users = [id(p) for p in self._referenced(with_kv)]
        shared = sum(p.nbytes for p in prefixes.values())
        return {
            "kv_budget_bytes": self.guard.budget,
            "kv_bits": kv_bits_name(self.settings.kv_bits),
            "kv_group_size": self.settings.kv_group_size,
            "share_prefix": self.settings.share_prefix,
            "kv_bytes": sum(s.kv_bytes for s in with_kv) + shared,
            "shared_prefix_bytes": shared,
            "delta_record_bytes": sum(delta_record_nbytes(c) for c in [s.cache for s in with_kv])
            + sum(delta_record_nbytes(p.snapshot) for p in prefixes.values()),
            "shared_prefixes": [
                {"tokens": p.length, "bytes": p.nbytes, "sessions": users.count(key), "listed": key in listed}
                for key, p in prefixes.items()
            ],
            "sessions": [
                {
                    "session": s.key_hash[:12],
                    "mode": s.mode,
                    "tokens": len(s.tokens),
                    "kv_bytes": s.kv_bytes,
                    "delta_record_bytes": delta_record_nbytes(s.cache),
                    "shared_prefix_tokens": _shared_tokens(s),
                }
                for s in with_kv
            ],
            "mlx_active_bytes": mx.get_active_memory(),
            "mlx_peak_bytes": mx.get_peak_memory(),
        }

    # ---- inside --------------------------------------------------------------------------------

    def _holdings(self, rooms: dict[str, int], growing: Session | None = None, pinned: Any = None) -> KvHoldings:
        """What holds KV, for the eviction plan: the answering sessions (by `rooms`, `growing`'s own bytes
        left out: the caller counts them) and the prefixes they reference are kept; idle sessions, least
        recently used first, then the prefix cache's entries may go."""
        busy = frozenset(rooms)
        if growing is not None:
            rooms = {key: room for key, room in rooms.items() if key != growing.key_hash}
        held, idle, pins = [], [], [] if pinned is None else [id(pinned)]
        prefixes = {} if pinned is None else {id(pinned): pinned.nbytes}
        for session in self.store.sessions():
            if session.cache is None:
                continue
            prefix = shared_prefix_of(session.cache)
            ref = None if prefix is None else id(prefix)
            if prefix is not None:
                prefixes[ref] = prefix.nbytes
            if session is growing or session.key_hash in busy:
                pins += [] if ref is None else [ref]
                if session is not growing:
                    held.append((session.key_hash, session.kv_bytes))
            else:
                idle.append(Holding(("session", session.file_stem), session.kv_bytes, ref))
        for key, _ in self.prefixes.entries():
            prefix = self.prefixes.shared_prefix(key)
            prefixes[id(prefix)] = prefix.nbytes
            idle.append(Holding(("prefix", key), 0, id(prefix)))
        return KvHoldings(answering_bytes(rooms, held), idle, prefixes, pins)

    def _evict(self, plan: list[Any]) -> None:
        for kind, key in plan:
            if kind == "session":
                self.store.evict(key, "kv budget")
            else:
                self.prefixes.evict(key)

    def _size(
        self, tokens: int, messages: int, prefix: SharedPrefix | None, snapshot: int, session: Session | None = None
    ) -> RequestSize:
        """A request's size referencing `prefix` (None: none), from what `session`'s cache holds now."""
        held = held_tokens = 0
        unaligned = False
        if session is not None and session.cache is not None:
            held, held_tokens = session.kv_bytes, len(session.tokens)
            unaligned = not self.guard.aligned(held - delta_record_nbytes(session.cache))
        shared, nbytes = (0, 0) if prefix is None else (prefix.length, prefix.nbytes)
        return RequestSize(tokens, messages, shared, snapshot, prefix, nbytes, held, held_tokens, unaligned)

    @staticmethod
    def _referenced(sessions: Iterable[Session]) -> list[SharedPrefix]:
        """The shared prefix each session with a cache references (one entry per referencing session)."""
        found = (shared_prefix_of(s.cache) for s in sessions if s.cache is not None)
        return [p for p in found if p is not None]


def _shared_tokens(session: Session) -> int:
    prefix = shared_prefix_of(session.cache) if session.cache else None
    return 0 if prefix is None else prefix.length
