"""The KV budget at run time: what a request will hold, whom to evict for it, when to refuse it.

Pure functions over byte counts; nothing here touches MLX or the session store. The scheduler
admits a job only when its KV room fits beside the rooms of the jobs running; the memory keeper
(memory_keeper.py) asks before a prefill (room for the whole request) and before every prefill and
decode step (room for what the step adds), at the places marked "memory guard" in prefill.py and
engine.py, and does the evicting itself.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Collection, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from common.kv_budget import CACHE_STEP, DELTA_RECORD_STEP, MIB, KvShape, kv_bytes_per_token, session_bytes

# MLX memory a forward pass needs beyond the weights and the caches (activations of one step).
WORKING_BYTES = 512 * MIB

# How MLX's allocators report a failed allocation (Metal, CUDA and CPU).
_ALLOCATION_FAILURE = re.compile(r"\[(\w+::)?malloc\]|out of memory|unable to allocate|insufficient memory", re.I)


class KvBudgetExceeded(Exception):
    """One request needs more KV than the whole budget holds: it is refused, nothing is evicted."""

    def __init__(self, needed: int, budget: int, tokens: int) -> None:
        super().__init__(
            f"this request needs {needed / MIB:.0f} MiB of KV cache for {tokens} tokens (prompt and "
            f"answer), more than the server's whole KV budget of {budget / MIB:.0f} MiB "
            "(--max-kv-bytes): send a shorter conversation or fewer max_tokens"
        )
        self.needed = needed
        self.budget = budget


@dataclass(frozen=True)
class KvGuard:
    """The budget and the arithmetic to keep within it, for one loaded model."""

    shape: KvShape
    budget: int
    kv_bits: int | None
    kv_group_size: int

    def session_bytes(self, tokens: int, messages: int = 0, shared: int = 0) -> int:
        """What a session (or a prefix snapshot) of `tokens` tokens holds itself: K/V for the tokens after
        a shared prefix of `shared` tokens it references (counted apart, once) in whole buffer steps, and
        its whole δ record with one more step (64 states): a record read back from disk, or copied from a
        prefix read back from disk, holds its states exactly and grows a step at a time from there."""
        return session_bytes(self.shape, tokens, self.kv_bits, self.kv_group_size, messages + DELTA_RECORD_STEP, shared)

    def request_bytes(self, size: "RequestSize") -> int:
        """What a request will hold itself: its own tokens, and a shared prefix it brings into memory. A
        cache it keeps holds at least what it holds now (buffers never shrink) and what it grows by; a
        cache whose buffers are not whole steps (read back from disk: exact, then grown a step at a time)
        may hold a K/V step more than whole steps of its tokens."""
        snapshot = self.session_bytes(size.snapshot) if size.snapshot else 0
        step = self.step_bytes() if size.unaligned else 0
        whole = self.session_bytes(size.tokens, size.messages, size.shared) + step
        grown = size.held + self.growth(size.held_tokens, max(0, size.tokens - size.held_tokens), size.shared)
        return max(whole, grown if size.held else 0) + snapshot

    def step_bytes(self) -> int:
        """One K/V buffer step (256 tokens): what a cache read back from disk may hold beyond whole steps."""
        return math.ceil(CACHE_STEP * kv_bytes_per_token(self.shape, self.kv_bits, self.kv_group_size))

    def aligned(self, kv_bytes: int) -> bool:
        """True when a cache whose own K/V take `kv_bytes` holds whole buffer steps, as one grown from empty."""
        return (kv_bytes / kv_bytes_per_token(self.shape, self.kv_bits, self.kv_group_size)) % CACHE_STEP == 0

    def growth(self, tokens: int, added: int, shared: int = 0) -> int:
        """What a session of `tokens` tokens (`shared` of them a prefix it references) takes to hold `added` more."""
        return self.session_bytes(tokens + added, 0, shared) - self.session_bytes(tokens, 0, shared)


@dataclass(frozen=True)
class RequestSize:
    """The most a request will hold: its tokens (prompt and whole answer), the δ-states it keeps, the
    tokens of a new shared-prefix snapshot it brings into memory (0: none), and the shared prefix it
    will reference: `shared` tokens of `prefix` (compared by identity only here), `prefix_bytes` held
    once apart from its own bytes; and what its cache holds now, if it keeps it."""

    tokens: int
    messages: int
    shared: int = 0
    snapshot: int = 0
    prefix: object | None = None
    prefix_bytes: int = 0
    held: int = 0  # what its cache holds now (0: none), for `held_tokens` tokens
    held_tokens: int = 0
    unaligned: bool = False  # its buffers may not be whole steps (a cache read back from disk)


@dataclass(frozen=True)
class Holding:
    """Something eviction may drop: an idle session's cache or a prefix cache entry."""

    key: Hashable
    nbytes: int  # what it holds itself: a session its own K/V and δ record, a prefix entry nothing more
    prefix: Hashable | None = None  # the shared prefix it references (a prefix entry: its own)


@dataclass(frozen=True)
class KvHoldings:
    """What holds KV now, each shared prefix counted once however many sessions reference it."""

    answering: int  # the sessions answering now, which are never evicted (see answering_bytes)
    idle: Sequence[Holding]  # what eviction may drop, in the order to drop it
    prefixes: Mapping[Hashable, int]  # every shared prefix a session references or the prefix cache lists
    pinned: Collection[Hashable] = ()  # the prefixes the answering sessions reference

    @property
    def total(self) -> int:
        """Bytes held in all."""
        return self.answering + sum(h.nbytes for h in self.idle) + sum(self.prefixes.values())


def eviction_plan(needed: int, budget: int, holdings: KvHoldings) -> list[Hashable]:
    """The idle holdings to drop, first ones first, so that `needed` more bytes fit in `budget`: the
    fewest first ones, or every one that frees anything when even that is not enough. Dropping a
    holding frees its own bytes, and its prefix's once nothing else references it (no other session,
    no prefix cache entry, no answering session); a holding that frees nothing (a prefix entry that
    sessions still reference) is never dropped."""
    refs = Counter(h.prefix for h in holdings.idle if h.prefix is not None)
    refs.update(holdings.pinned)
    total = holdings.total
    drop: list[Hashable] = []
    for holding in holdings.idle:
        if total + needed <= budget:
            break
        last = holding.prefix is not None and refs[holding.prefix] == 1
        freed = holding.nbytes + (holdings.prefixes.get(holding.prefix, 0) if last else 0)
        if freed == 0:
            continue
        drop.append(holding.key)
        total -= freed
        if holding.prefix is not None:
            refs[holding.prefix] -= 1
    return drop


def answering_bytes(rooms: Mapping[Hashable, int], held: Iterable[tuple[Hashable, int]]) -> int:
    """What the running jobs take: per session key, the KV room its job was admitted with (`rooms`)
    or, when more, what its caches hold now (`held`: key and bytes of each busy session's cache)."""
    now: dict[Hashable, int] = {}
    for key, nbytes in held:
        now[key] = now.get(key, 0) + nbytes
    return sum(max(rooms.get(key, 0), now.get(key, 0)) for key in rooms.keys() | now.keys())


def effective_budget(max_kv_bytes: int, memory_limit: int, resident_bytes: int) -> int:
    """The KV budget in force: the configured one, or less when MLX's memory limit leaves less room
    next to what is already resident (the weights) and one forward pass's working memory."""
    return max(0, min(max_kv_bytes, memory_limit - resident_bytes - WORKING_BYTES))


def is_allocation_failure(exc: BaseException) -> bool:
    """True for the errors MLX raises when an allocation fails."""
    return isinstance(exc, MemoryError) or (
        isinstance(exc, RuntimeError) and _ALLOCATION_FAILURE.search(str(exc)) is not None
    )
