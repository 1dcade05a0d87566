"""The KV budget at run time: what a request will hold, whom to evict for it, when to refuse it.

Pure functions over byte counts; nothing here touches MLX or the session store. The scheduler
admits a job only when its KV room fits beside the rooms of the jobs running; the memory keeper
(memory_keeper.py) asks before a prefill (room for the whole request) and before every prefill and
decode step (room for what the step adds), at the places marked "memory guard" in prefill.py and
engine.py, and does the evicting itself.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from common.kv_budget import MIB, KvShape, session_bytes

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

    def session_bytes(self, tokens: int, messages: int = 0) -> int:
        """What a session (or a prefix snapshot) of `tokens` tokens will hold."""
        return session_bytes(self.shape, tokens, self.kv_bits, self.kv_group_size, messages)


def eviction_plan(needed: int, budget: int, held: Sequence[tuple[Hashable, int]]) -> list[Hashable] | None:
    """The holdings to drop, first ones first (callers list them least recently used first), so that
    `needed` more bytes fit in `budget`; None when even dropping all of them is not enough."""
    if needed > budget:
        return None
    total = sum(nbytes for _, nbytes in held)
    drop: list[Hashable] = []
    for key, nbytes in held:
        if total + needed <= budget:
            break
        drop.append(key)
        total -= nbytes
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
