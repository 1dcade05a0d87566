"""A prompt cache cut into chunks of arrays, and put back together: what the disk cache stores.

A chunk holds the tokens [start, offset) of a cache: every layer's K/V for them (float or mlx-lm's
quantized triple) and, for δ layers, the δ record's kept runs that touch [start, offset] (clipped
to it) plus the state at the end. Chunks put back in order rebuild the cache exactly: a later
chunk's runs replace whatever an earlier one kept from its start on, as a memory write there does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from sidecar.delta.cache import DeltaLayerCache, DeltaRecord


@dataclass(frozen=True)
class CacheChunk:
    """The arrays of tokens [start, end) of a cache, and the δ records' scalars at `end`."""

    start: int
    end: int
    arrays: dict[str, mx.array]
    records: list[dict[str, Any] | None]  # per layer: recorded, known, has_latest; None: no δ

    def cut(self, end: int) -> CacheChunk:
        """The same chunk used only up to `end` (start <= end <= self.end); arrays are sliced when filled."""
        return CacheChunk(self.start, end, self.arrays, self.records) if end < self.end else self


def cache_chunk(cache: list[Any], start: int) -> CacheChunk:
    """The chunk of `cache` from `start` to its offset (lazy slices: MLX arrays never change in place)."""
    end = cache[0].offset
    arrays: dict[str, mx.array] = {}
    records: list[dict[str, Any] | None] = []
    for i, layer in enumerate(cache):
        for name, part in zip("kv", _kv_range(layer, start, end)):
            for j, array in enumerate(_parts(part)):
                arrays[f"{name}{i}.{j}"] = array
        if not isinstance(layer, DeltaLayerCache):
            records.append(None)
            continue
        record = layer.record
        picked = [n for n, (s, e) in enumerate(zip(record.starts, record.ends)) if s <= end and e >= start]
        if picked:
            runs = [[max(record.starts[n], start) for n in picked], [min(record.ends[n], end) for n in picked]]
            arrays[f"runs{i}"] = mx.array(np.array(runs, dtype=np.int32))
            arrays[f"kept{i}"] = record.kept[:, mx.array(picked)]
        if record.latest is not None:
            arrays[f"latest{i}"] = record.latest
        records.append({"recorded": record.recorded, "known": record.known, "has_latest": record.latest is not None})
    return CacheChunk(start, end, arrays, records)


@dataclass(frozen=True)
class CacheLayout:
    """What every chunk of one model's caches holds: each K/V array's shape bar its token axis and
    its dtype, and each layer's δ-state shape (None: a layer without δ)."""

    kv: dict[str, tuple[tuple[int, ...], mx.Dtype]]
    states: tuple[tuple[int, ...] | None, ...]


_KV_NAME = re.compile(r"[kv](\d+)\.(\d+)")


def cache_layout(model: Any, cache: list[Any]) -> CacheLayout:
    """The layout of `model`'s caches, read off a one-token pass over `cache` (a new one, thrown away)."""
    model(mx.array([[0]]), cache=cache)
    states = tuple(layer.record.state_shape if isinstance(layer, DeltaLayerCache) else None for layer in cache)
    return CacheLayout(kv_layout(cache_chunk(cache, 0)), states)


def kv_layout(chunk: CacheChunk) -> dict[str, tuple[tuple[int, ...], mx.Dtype]]:
    """Each of the chunk's K/V arrays: its shape without the token axis, and its dtype."""
    return {name: (_bar_tokens(a.shape), a.dtype) for name, a in chunk.arrays.items() if _KV_NAME.fullmatch(name)}


def check_chunk(chunk: CacheChunk, layout: CacheLayout) -> None:
    """Raise ValueError, saying what differs, unless the chunk's arrays fit `layout` whole (as read from
    a file: every array holds the chunk's tokens [start, end))."""
    length = chunk.end - chunk.start
    kv = {name: a for name, a in chunk.arrays.items() if _KV_NAME.fullmatch(name)}
    if set(kv) != set(layout.kv):
        raise ValueError(f"K/V arrays {sorted(set(kv) ^ set(layout.kv))[:4]} are not this model's")
    for name, array in kv.items():
        shape, dtype = layout.kv[name]
        if array.ndim < 2 or _bar_tokens(array.shape) != shape or array.shape[-2] != length or array.dtype != dtype:
            raise ValueError(f"{name} is {array.dtype} {array.shape}, not {dtype} {shape} over {length} tokens")
    if len(chunk.records) != len(layout.states):
        raise ValueError(f"{len(chunk.records)} layers, not {len(layout.states)}")
    for i, (meta, state) in enumerate(zip(chunk.records, layout.states)):
        _check_record(chunk, i, meta, state)
    known = {f"{kind}{i}" for kind in ("runs", "kept", "latest") for i in range(len(layout.states))}
    stray = set(chunk.arrays) - set(kv) - known
    if stray:
        raise ValueError(f"unexpected arrays {sorted(stray)[:4]}")


def _check_record(chunk: CacheChunk, i: int, meta: Any, state: tuple[int, ...] | None) -> None:
    names = [f"runs{i}", f"kept{i}", f"latest{i}"]
    if state is None:
        if meta is not None or any(name in chunk.arrays for name in names):
            raise ValueError(f"layer {i} has no δ-state in this model")
        return
    if not isinstance(meta, dict) or set(meta) != {"recorded", "known", "has_latest"}:
        raise ValueError(f"layer {i}'s δ record is missing or malformed")
    if not (_natural(meta["recorded"]) and isinstance(meta["known"], bool) and isinstance(meta["has_latest"], bool)):
        raise ValueError(f"layer {i}'s δ record is malformed")
    runs, kept, latest = (chunk.arrays.get(name) for name in names)
    if (runs is None) != (kept is None):
        raise ValueError(f"layer {i} has δ runs without states, or states without runs")
    if runs is not None and kept is not None:
        if runs.dtype != mx.int32 or runs.ndim != 2 or runs.shape[0] != 2:
            raise ValueError(f"runs{i} is {runs.dtype} {runs.shape}, not int32 (2, n)")
        if kept.shape != (1, runs.shape[1], *state):
            raise ValueError(f"kept{i} is {kept.shape}, not {(1, runs.shape[1], *state)}")
        starts, ends = np.array(runs).tolist()
        if any(not chunk.start <= s <= e <= chunk.end for s, e in zip(starts, ends)):
            raise ValueError(f"runs{i} leave the chunk's tokens [{chunk.start}, {chunk.end}]")
    if meta["has_latest"] != (latest is not None):
        raise ValueError(f"layer {i}'s latest δ-state is missing or unexpected")
    if latest is not None and latest.shape != (1, *state):
        raise ValueError(f"latest{i} is {latest.shape}, not {(1, *state)}")


def fill_cache(cache: list[Any], chunks: list[CacheChunk]) -> None:
    """Put consecutive chunks (the first from offset 0, each possibly cut) into an empty cache, or into
    one that starts from a shared prefix: then the first chunk is that prefix's, already referenced."""
    if not chunks:
        return
    start = cache[0].offset
    own = [chunk for chunk in chunks if chunk.start >= start]
    if start and (chunks[0].end != start or len(own) != len(chunks) - 1):
        raise ValueError(f"the first chunk must be the {start}-token shared prefix the cache starts from")
    for i, layer in enumerate(cache):
        if own:
            pieces = [_layer_kv(chunk, i) for chunk in own]
            keys = [_concat([p[0][j] for p in pieces]) for j in range(len(pieces[0][0]))]
            values = [_concat([p[1][j] for p in pieces]) for j in range(len(pieces[0][1]))]
            layer.keys = keys[0] if len(keys) == 1 else tuple(keys)
            layer.values = values[0] if len(values) == 1 else tuple(values)
        layer.offset = chunks[-1].end
        if isinstance(layer, DeltaLayerCache):
            layer.record = _record(layer.record.state_shape, chunks, i)
    mx.eval([c.state for c in cache])


def _layer_kv(chunk: CacheChunk, i: int) -> tuple[list[mx.array], list[mx.array]]:
    length = chunk.end - chunk.start
    out = []
    for name in ("k", "v"):
        parts, j = [], 0
        while f"{name}{i}.{j}" in chunk.arrays:
            parts.append(chunk.arrays[f"{name}{i}.{j}"][..., :length, :])
            j += 1
        out.append(parts)
    return out[0], out[1]


def _record(shape: tuple[int, ...], chunks: list[CacheChunk], i: int) -> DeltaRecord:
    starts: list[int] = []
    ends: list[int] = []
    kept: list[mx.array] = []
    for chunk in chunks:
        if f"runs{i}" not in chunk.arrays:
            continue
        runs = np.array(chunk.arrays[f"runs{i}"]).tolist()
        # Runs kept beyond this chunk's end were cut away with the tokens after it.
        use = [n for n, s in enumerate(runs[0]) if s <= chunk.end]
        if not use:
            continue
        first = runs[0][use[0]]
        while starts and starts[-1] >= first:  # this chunk's runs replace what was kept from `first` on
            starts.pop(), ends.pop(), kept.pop()
        if ends and ends[-1] >= first:
            ends[-1] = first - 1
        states = chunk.arrays[f"kept{i}"]
        for n in use:
            starts.append(runs[0][n])
            ends.append(min(runs[1][n], chunk.end))
            kept.append(states[:, n])
    last = chunks[-1]
    meta = last.records[i] or {"recorded": 0, "known": True, "has_latest": False}
    latest = last.arrays.get(f"latest{i}") if meta["has_latest"] else None
    runs_array = mx.array(np.array([starts, ends], dtype=np.int32).reshape(2, len(starts)))
    stacked = mx.stack(kept, axis=1) if kept else None
    record = DeltaRecord.from_state((stacked, runs_array, latest, meta["recorded"], meta["known"], mx.array(shape)))
    record.trim(last.end)  # the last chunk may be cut: the state there is a kept one, or unknown
    return record


def _kv_range(layer: Any, start: int, end: int) -> tuple[Any, Any]:
    if hasattr(layer, "kv_range"):
        return layer.kv_range(start, end)
    return tuple(_slice(part, start, end) for part in (layer.keys, layer.values))  # type: ignore[return-value]


def _slice(part: Any, start: int, end: int) -> Any:
    return tuple(p[..., start:end, :] for p in part) if isinstance(part, (tuple, list)) else part[..., start:end, :]


def _bar_tokens(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (*shape[:-2], shape[-1])


def _natural(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _parts(part: Any) -> tuple[mx.array, ...]:
    return tuple(part) if isinstance(part, (tuple, list)) else (part,)


def _concat(arrays: list[mx.array]) -> mx.array:
    return arrays[0] if len(arrays) == 1 else mx.concatenate(arrays, axis=2)
