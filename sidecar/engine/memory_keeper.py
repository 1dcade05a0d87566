"""The one place that keeps the caches within the KV budget: room is made before a step, never after.

Before a prefill, room for the whole request (and a new shared-prefix snapshot); before every
prefill and decode step, room for what the step adds; after an answer, the byte and count bounds.
Idle sessions go first (least recently used first), then shared prefixes; the sessions answering
now are never evicted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import mlx.core as mx

from common.kv_budget import kv_bits_name
from common.settings import SidecarSettings
from sidecar.delta.api import delta_record_nbytes
from sidecar.engine.failures import JobCounters
from sidecar.engine.memory_guard import KvBudgetExceeded, KvGuard, answering_bytes, eviction_plan
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
    ) -> None:
        self.guard = guard
        self.store = store
        self.prefixes = prefixes
        self.settings = settings
        self.counters = counters
        self._rooms = rooms  # the sessions answering now: each one's KV room, as admitted

    def reserve(self, session: Session, tokens: int, messages: int, snapshot_tokens: int = 0) -> None:
        """Make room for `session` to hold `tokens` tokens (plus a prefix snapshot) beside the sessions
        answering now; raise KvBudgetExceeded when it cannot fit even alone."""
        needed = self.needed(tokens, messages, snapshot_tokens)
        if needed > self.guard.budget:
            raise KvBudgetExceeded(needed, self.guard.budget, tokens)
        self.make_room(needed, growing=session)

    def needed(self, tokens: int, messages: int, snapshot_tokens: int = 0) -> int:
        """Bytes of a session of `tokens` tokens, plus a prefix snapshot of `snapshot_tokens` (0: none)."""
        snapshot = self.guard.session_bytes(snapshot_tokens) if snapshot_tokens else 0
        return self.guard.session_bytes(tokens, messages) + snapshot

    def make_room_to_grow(self, growth: Iterable[tuple[int, int]]) -> None:
        """Make room for sessions of `length` tokens to take `added` more, for each (length, added).
        Called before every step even when nothing grows: a shared prefix read in since the last
        step (from disk, or a new snapshot) is idle and goes again if it does not fit."""
        size = self.guard.session_bytes
        self.make_room(sum(size(length + added) - size(length) for length, added in growth))

    def make_room(self, needed: int, growing: Session | None = None) -> None:
        """Evict idle sessions (least recently used first), then shared prefixes, until `needed` bytes
        fit in the budget beside the caches of the sessions answering now (`growing`'s own cache is
        part of `needed`); each answering session counts for the room its job was admitted with, so
        that idle holdings never take what it will grow into. Answering sessions are never evicted:
        when they hold the rest, every idle one goes and the step runs (a failed allocation then
        fails its requests, not the server)."""
        rooms = self._rooms()
        busy = frozenset(rooms)
        if growing is not None:
            rooms.pop(growing.key_hash, None)  # its room is `needed`
        sessions = [s for s in self.store.sessions() if s.cache is not None and s is not growing]
        answering = answering_bytes(rooms, [(s.key_hash, s.kv_bytes) for s in sessions if s.key_hash in busy])
        idle = [(("session", s.file_stem), s.kv_bytes) for s in sessions if s.key_hash not in busy]
        idle += [(("prefix", key), nbytes) for key, nbytes in self.prefixes.entries()]
        plan = eviction_plan(answering + needed, self.guard.budget, idle)
        for kind, key in plan if plan is not None else [key for key, _ in idle]:
            if kind == "session":
                self.store.evict(key, "kv budget")
            else:
                self.prefixes.evict(key)

    def after_allocation_failure(self, key_hash: str, exc: BaseException) -> None:
        """Drop the caches a failed allocation may have left half-written, and MLX's free buffers."""
        self.counters.add(allocation_failures=1)
        log.error("out of memory while answering session %s: %s", key_hash[:12], exc)
        for session in self.store.peek_modes(key_hash):
            session.drop_cache()
        mx.clear_cache()

    def enforce_limits(self) -> None:
        """Sessions and shared prefixes together stay within the KV byte bound (sessions go first);
        the sessions answering now keep their caches."""
        self.store.enforce_limits(keep=frozenset(self._rooms()), reserved_bytes=self.prefixes.nbytes)
        self.prefixes.trim_to_bytes(max(0, self.store.max_kv_bytes - self.store.kv_bytes))

    def report(self, sessions: list[Session]) -> dict[str, Any]:
        """The budget and what holds it, for /health."""
        with_kv = [s for s in sessions if s.cache is not None]
        return {
            "kv_budget_bytes": self.guard.budget,
            "kv_bits": kv_bits_name(self.settings.kv_bits),
            "kv_group_size": self.settings.kv_group_size,
            "kv_bytes": self.store.kv_bytes + self.prefixes.nbytes,
            "shared_prefix_bytes": self.prefixes.nbytes,
            "delta_record_bytes": sum(delta_record_nbytes(s.cache) for s in with_kv) + self.prefixes.delta_nbytes,
            "sessions": [
                {
                    "session": s.key_hash[:12],
                    "mode": s.mode,
                    "tokens": len(s.tokens),
                    "kv_bytes": s.kv_bytes,
                    "delta_record_bytes": delta_record_nbytes(s.cache),
                }
                for s in with_kv
            ],
            "mlx_active_bytes": mx.get_active_memory(),
            "mlx_peak_bytes": mx.get_peak_memory(),
        }
