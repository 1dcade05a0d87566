"""Prompt prefixes shared across sessions: KV and δ-states of prefixes written from a zero state.

Every OpenClaw session opens with the same long system prompt. Because a session's δ-state starts
at zero and is a deterministic function of what it writes, the KV cache and the δ-state after that
prompt are the same for every session, so one copy is computed and kept here (a `SharedPrefix`); a
new session references its K/V (with sharing off: starts from a private copy of it). Entries are
keyed by mode ("delta" or "base"), looked up in mlx-lm's token trie, and evicted least recently used
first, by count and by bytes.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from mlx_lm.models.cache import PromptTrie

from sidecar.delta.api import delta_record_nbytes, restorable_offset
from sidecar.delta.shared_prefix import SharedPrefix

# A longer stored prefix is copied whole and then cut back, so a partial match is used only
# when it saves enough: at least this many tokens and a quarter of the stored prefix.
PARTIAL_MIN_TOKENS = 256


@dataclass
class _Entry:
    shared: SharedPrefix

    @property
    def cache(self) -> list[Any]:
        return self.shared.snapshot

    @property
    def nbytes(self) -> int:
        return self.shared.nbytes


class PrefixCache:
    """A bounded set of (mode, prefix tokens) → cache snapshots."""

    def __init__(self, max_entries: int = 8, share: bool = True):
        self.max_entries = max_entries
        self.share = share  # sessions reference a stored prefix's K/V, else copy them
        self._trie = PromptTrie()
        self._entries: OrderedDict[tuple[str, tuple[int, ...]], _Entry] = OrderedDict()
        self.lookups = 0
        self.hits = 0
        self.hit_tokens = 0

    @property
    def nbytes(self) -> int:
        """Bytes held by all snapshots."""
        return sum(e.nbytes for e in self._entries.values())

    def contains(self, mode: str, tokens: list[int]) -> bool:
        """True if exactly this prefix is stored."""
        return (mode, tuple(tokens)) in self._entries

    def peek(self, mode: str, tokens: list[int]) -> list[Any] | None:
        """The stored snapshot of exactly this prefix, not copied: to read from, never to extend."""
        entry = self._entries.get((mode, tuple(tokens)))
        return None if entry is None else entry.cache

    def shared_prefix(self, key: tuple[str, tuple[int, ...]]) -> SharedPrefix:
        """The stored prefix of one entry."""
        return self._entries[key].shared

    def fetch(self, mode: str, tokens: list[int]) -> tuple[int, list[Any]] | None:
        """A cache for the longest stored prefix of `tokens`, and its length: referencing the stored
        K/V when sharing (a longer stored prefix cut back is always a private copy)."""
        if self.max_entries == 0:
            return None
        self.lookups += 1
        found = self._trie.search(mode, tokens)
        cut = self._cut_length(mode, found) if found.longer is not None else 0
        if found.exact is not None:
            length, stored = len(tokens), tokens
        elif cut > len(found.shorter or ()):
            # A longer stored prefix shares the first `common_prefix` tokens: cut a copy back to them
            # (or to the last offset before them whose δ-state it kept; the caller prefills the rest).
            length, stored = cut, found.longer
        elif found.shorter:
            length, stored = len(found.shorter), found.shorter
        else:
            return None
        key = (mode, tuple(stored))
        self._entries.move_to_end(key)
        if self.share and len(stored) == length:
            cache = self._entries[key].shared.start_from()
        else:
            cache = copy.deepcopy(self._entries[key].cache)
            for layer in cache:
                layer.trim(len(stored) - length)
        self.hits += 1
        self.hit_tokens += length
        return length, cache

    def start_from(self, mode: str, tokens: list[int]) -> list[Any] | None:
        """A new cache referencing the stored prefix of exactly `tokens`; None when sharing is off or
        there is none (not counted as a lookup: a restore's, not a new session's)."""
        entry = self._entries.get((mode, tuple(tokens)))
        if not self.share or entry is None:
            return None
        self._entries.move_to_end((mode, tuple(tokens)))
        return entry.shared.start_from()

    def insert(self, mode: str, tokens: list[int], cache: list[Any], copy_cache: bool = True) -> None:
        """Keep a snapshot of `cache`, which holds exactly `tokens` (the cache itself when `copy_cache` is
        False: the caller no longer uses it); shorter stored prefixes of it go."""
        key = (mode, tuple(tokens))
        if self.max_entries == 0:
            return
        if key in self._entries:
            self._entries.move_to_end(key)
            return
        self._trie.add(mode, tokens, key)
        self._entries[key] = _Entry(SharedPrefix(copy.deepcopy(cache) if copy_cache else cache))
        for length, _ in self._trie.pop_prefixes(mode, tokens):
            self._entries.pop((mode, tuple(tokens[:length])), None)
        while len(self._entries) > self.max_entries:
            self._evict()

    def entries(self) -> list[tuple[tuple[str, tuple[int, ...]], int]]:
        """Every snapshot's key and bytes, least recently used first."""
        return [(key, entry.nbytes) for key, entry in self._entries.items()]

    def evict(self, key: tuple[str, tuple[int, ...]]) -> None:
        """Drop one snapshot."""
        if self._entries.pop(key, None) is not None:
            self._trie.pop(key[0], list(key[1]))

    @property
    def delta_nbytes(self) -> int:
        """Bytes of the snapshots' δ records."""
        return sum(delta_record_nbytes(e.cache) for e in self._entries.values())

    def trim_to_bytes(self, limit: int) -> None:
        """Evict least recently used snapshots until at most `limit` bytes remain."""
        while self._entries and self.nbytes > limit:
            self._evict()

    def stats(self) -> dict[str, Any]:
        """Entries, tokens, bytes and hit rate, for /health."""
        return {
            "enabled": self.max_entries > 0,
            "entries": len(self._entries),
            "tokens": sum(len(tokens) for _, tokens in self._entries),
            "bytes": self.nbytes,
            "lookups": self.lookups,
            "hits": self.hits,
            "hit_rate": round(self.hits / self.lookups, 3) if self.lookups else None,
            "tokens_reused": self.hit_tokens,
        }

    def _evict(self) -> None:
        self.evict(next(iter(self._entries)))

    def _cut_length(self, mode: str, found: Any) -> int:
        """How much of a longer stored prefix to use: the shared part, back to a kept δ-state, when worth it."""
        length = restorable_offset(self._entries[(mode, tuple(found.longer))].cache, found.common_prefix)
        return length if _worth_cutting(length, len(found.longer)) else 0


def _worth_cutting(shared: int, stored: int) -> bool:
    return shared >= max(PARTIAL_MIN_TOKENS, stored // 4)
