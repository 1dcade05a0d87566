"""A prompt prefix's cache held once, and the sessions that start from it by reference.

Every OpenClaw session opens with the same long system prompt, whose K/V and δ-states are the same
for every session (the δ-state starts at zero). A `SharedPrefix` freezes one computed copy; a session
cache made by `start_from` references its K/V layer by layer (never copied, never written) and takes a
private copy of its δ records (small: a state per 64 tokens). Its own buffers hold only the tokens
after the prefix, and its `nbytes` counts only them.
"""

from __future__ import annotations

import copy
from typing import Any

import mlx.core as mx

from sidecar.delta.cache import DeltaKVCache, DeltaLayerCache, QuantizedDeltaKVCache
from sidecar.delta.prefixed_kv import PrefixedKV, PrefixedKVCache, PrefixedQuantizedKVCache, PrefixSegment


class SharedPrefix:
    """A frozen cache of `length` tokens: its layers' K/V as segments that session caches reference."""

    def __init__(self, cache: list[Any]) -> None:
        unshare(cache)  # a snapshot of a cache that itself started from a prefix holds every token
        self.snapshot = cache  # read (chunks for the disk cache), never changed again
        self.length: int = cache[0].offset
        self.nbytes: int = sum(layer.nbytes for layer in cache)
        self.segments = tuple(PrefixSegment(*layer.kv_range(0, self.length), self.length, self) for layer in cache)
        mx.eval([(s.keys, s.values) for s in self.segments])

    def __deepcopy__(self, memo: dict[int, Any]) -> SharedPrefix:
        return self

    def start_from(self) -> list[Any]:
        """A new session cache at `length` tokens that references this prefix's K/V."""
        controls = copy.copy(next((c.controls for c in self.snapshot if isinstance(c, DeltaLayerCache)), None))
        cache = [_empty_like(layer, controls) for layer in self.snapshot]
        for layer, segment, source in zip(cache, self.segments, self.snapshot):
            layer.attach(segment)
            if isinstance(source, DeltaLayerCache):
                layer.record = copy.deepcopy(source.record)
        return cache


def shared_prefix_of(cache: list[Any]) -> SharedPrefix | None:
    """The shared prefix a cache starts from by reference, or None for a private cache."""
    segment = getattr(cache[0], "prefix", None) if cache else None
    return None if segment is None else segment.owner


def unshare(cache: list[Any]) -> None:
    """Make a cache private: every layer copies its prefix's K/V in front of its own."""
    for layer in cache:
        if isinstance(layer, PrefixedKV):
            layer.unshare()


def _empty_like(layer: Any, controls: Any) -> Any:
    if isinstance(layer, QuantizedDeltaKVCache):
        return QuantizedDeltaKVCache(layer.state_shape, controls, layer.group_size, layer.bits)
    if isinstance(layer, DeltaKVCache):
        return DeltaKVCache(layer.state_shape, controls)
    if isinstance(layer, PrefixedQuantizedKVCache):
        return PrefixedQuantizedKVCache(layer.group_size, layer.bits)
    if isinstance(layer, PrefixedKVCache):
        return PrefixedKVCache()
    raise TypeError(f"a {type(layer).__name__} cannot start from a shared prefix")
