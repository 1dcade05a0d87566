"""Layer caches whose first tokens are a shared prefix's K/V, referenced instead of copied.

A layer cache with a `prefix` segment holds the tokens [0, P) by reference (the segment is never
written to) and its own K/V buffer holds only the tokens [P, offset). `offset` stays the absolute
number of tokens, as everywhere else; the own buffer is indexed from P. Attention reads both
segments (sidecar/delta/segment_attention.py). A trim that reaches into the prefix first turns the
layer into a private contiguous copy, so every rollback stays exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import KVCache, QuantizedKVCache

KvParts = mx.array | tuple[mx.array, ...]  # float K or V, or mlx-lm's quantized (packed, scales, biases)


@dataclass(frozen=True, eq=False)
class PrefixSegment:
    """One layer's K/V of a shared prefix's first `length` tokens; immutable, shared by reference."""

    keys: KvParts
    values: KvParts
    length: int
    owner: Any  # the SharedPrefix it belongs to (for accounting: one object per prefix)

    def __deepcopy__(self, memo: dict[int, Any]) -> PrefixSegment:
        return self  # a copied cache references the same prefix: it is never written to

    @property
    def quantized(self) -> bool:
        """True when the K/V are mlx-lm's quantized triples."""
        return isinstance(self.keys, tuple)


class PrefixedKV:
    """What a layer cache needs to start from a `PrefixSegment` (mixed in before mlx-lm's cache class)."""

    prefix: PrefixSegment | None = None
    offset: int
    keys: Any
    values: Any

    def attach(self, segment: PrefixSegment) -> None:
        """Start this empty layer cache at `segment.length` tokens, referencing the segment."""
        if self.offset or self.keys is not None:
            raise ValueError("only an empty layer cache can start from a shared prefix")
        self.prefix, self.offset = segment, segment.length

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> Any:
        """Append to the own buffer and return its K/V (the prefix's, when there is one, come apart)."""
        if self.prefix is None:
            return super().update_and_fetch(keys, values)  # type: ignore[misc]
        # mlx-lm's update indexes its buffer by `offset`: run it on the own segment's offsets.
        self.offset -= self.prefix.length
        try:
            return super().update_and_fetch(keys, values)  # type: ignore[misc]
        finally:
            self.offset += self.prefix.length

    def own_kv(self) -> tuple[Any, Any]:
        """The own buffer's K/V for tokens [P, offset) (P = 0 without a prefix)."""
        start = self.prefix.length if self.prefix is not None else 0
        return tuple(_take(part, 0, self.offset - start) for part in (self.keys, self.values))  # type: ignore[return-value]

    def kv_range(self, start: int, end: int) -> tuple[Any, Any]:
        """The K/V of tokens [start, end), whichever segments hold them (a view or a concatenation)."""
        if self.prefix is None:
            return _take(self.keys, start, end), _take(self.values, start, end)
        P = self.prefix.length
        out = []
        for shared, own in ((self.prefix.keys, self.keys), (self.prefix.values, self.values)):
            if start >= P:
                out.append(_take(own, start - P, end - P))
            elif end <= P:
                out.append(_take(shared, start, end))
            else:
                out.append(_join(_take(shared, start, P), _take(own, 0, end - P)))
        return out[0], out[1]

    def unshare(self) -> None:
        """Become a private contiguous cache: the prefix's K/V are copied in front of the own ones."""
        if self.prefix is None:
            return
        keys, values = self.kv_range(0, self.offset)
        self.keys, self.values, self.prefix = keys, values, None

    def trim(self, n: int) -> int:
        """Forget the last `n` tokens; a trim into the prefix makes the cache private first."""
        if self.prefix is not None and self.offset - n < self.prefix.length:
            self.unshare()
        return super().trim(n)  # type: ignore[misc]


class PrefixedKVCache(PrefixedKV, KVCache):
    """mlx-lm's KVCache that can start from a shared prefix."""


class PrefixedQuantizedKVCache(PrefixedKV, QuantizedKVCache):
    """mlx-lm's QuantizedKVCache that can start from a shared prefix."""

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else QuantizedKVCache.nbytes.fget(self)


def _take(part: KvParts | None, start: int, end: int) -> Any:
    if part is None:
        return None
    if isinstance(part, (tuple, list)):
        return tuple(p[..., start:end, :] for p in part)
    return part[..., start:end, :]


def _join(first: KvParts, second: KvParts | None) -> KvParts:
    if second is None:
        return first
    if isinstance(first, tuple):
        return tuple(mx.concatenate([a, b], axis=2) for a, b in zip(first, second))
    return mx.concatenate([first, second], axis=2)
