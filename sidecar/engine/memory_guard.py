"""The KV budget at run time: what a request will hold, whom to evict for it, when to refuse it.

Pure functions over byte counts; nothing here touches MLX or the session store. The scheduler
admits a job only when its KV room fits beside the rooms of the jobs running; the memory keeper
(memory_keeper.py) asks before a prefill (room for the whole request) and before every prefill and
decode step (room for what the step adds), at the places marked "memory guard" in prefill.py and
engine.py, and does the evicting itself.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Collection, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from common.kv_budget import CACHE_STEP, DELTA_RECORD_STEP, MIB, KvShape, session_bytes

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
        """The most a session (or a prefix snapshot) of `tokens` tokens will hold itself: K/V for the tokens
        after a shared prefix of `shared` tokens it references (counted apart, once), its whole δ record,
        and one more step of each: a cache read back from disk holds its tokens exactly and grows a step
        at a time from there, so its buffers can end up to a step past whole steps."""
        slack_tokens, slack_states = CACHE_STEP, DELTA_RECORD_STEP
        return session_bytes(
            self.shape, tokens + slack_tokens, self.kv_bits, self.kv_group_size, messages + slack_states, shared
        )

    def prefix_bytes(self, tokens: int) -> int:
        """What a shared-prefix snapshot of `tokens` tokens holds (it never grows: no step more)."""
        return session_bytes(self.shape, tokens, self.kv_bits, self.kv_group_size)

    def request_bytes(self, size: "RequestSize") -> int:
        """What a request will hold itself: its own tokens, and a shared prefix it brings into memory."""
        snapshot = self.prefix_bytes(size.snapshot) if size.snapshot else 0
        return self.session_bytes(size.tokens, size.messages, size.shared) + snapshot

    def growth(self, tokens: int, added: int, shared: int = 0) -> int:
        """What a session of `tokens` tokens (`shared` of them a prefix it references) takes to hold `added` more."""
        return self.session_bytes(tokens + added, 0, shared) - self.session_bytes(tokens, 0, shared)


@dataclass(frozen=True)
class RequestSize:
    """The most a request will hold: its tokens (prompt and whole answer), the δ-states it keeps, the
    tokens of a new shared-prefix snapshot it brings into memory (0: none), and the shared prefix it
    will reference: `shared` tokens of `prefix` (compared by identity only here), `prefix_bytes` held
    once apart from its own bytes."""

    tokens: int
    messages: int
    shared: int = 0
    snapshot: int = 0
    prefix: object | None = None
    prefix_bytes: int = 0


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
