"""Per-layer caches for δ layers: mlx-lm's KV cache (float or quantized) plus a record of δ-states.

The record keeps the δ-state after every `DELTA_RECORD_INTERVAL`-th token, at the offsets the
caller marks (message starts, memory-snippet writes) and after the last token, instead of after
every token: 1/64 of the bytes. A trim to a kept offset is exact at once; a trim anywhere else
leaves the state unknown until the caller prefills again from `restorable_offset(...)`, at most
63 tokens back (the engine does this; a forward from an unknown state raises MissingDeltaState).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache, QuantizedKVCache

from common.kv_budget import DELTA_RECORD_INTERVAL, DELTA_RECORD_STEP
from sidecar.delta.prefixed_kv import PrefixedKV


class MissingDeltaState(RuntimeError):
    """The cache was trimmed to an offset whose δ-state it did not keep."""


@dataclass
class DeltaControls:
    """Per-call switches shared by all layers of one prompt cache."""

    enabled: bool = True
    write: bool = True
    message_ids: np.ndarray | None = None  # [B, T_call] for message-mean writes; -1 = not written
    keep: frozenset[int] = field(default_factory=frozenset)  # offsets whose state must be kept


class DeltaRecord:
    """δ-states of one layer: runs [start, end] over which the state is constant, and the latest.

    `latest` is the state at every offset from `recorded` to the cache's offset (tokens read with δ
    off or without writes leave the state as it is). Kept run i holds `kept[:, i]` for every
    offset in [starts[i], ends[i]]: one offset for a written token, a whole stretch for tokens
    that did not write.
    """

    def __init__(self, state_shape: tuple[int, ...]):
        self.state_shape = state_shape  # per batch item: (r, r) or (heads, r, r)
        self.kept: mx.array | None = None  # [B, capacity, *state_shape], float32
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.latest: mx.array | None = None  # None: the zero state (nothing written yet)
        self.recorded = 0
        self.known = True  # False after a trim to an offset that was not kept

    def state_at(self, offset: int, batch: int) -> mx.array:
        """The δ-state after `offset` tokens; raises MissingDeltaState where it was not kept."""
        if offset >= self.recorded:
            if not self.known:
                raise MissingDeltaState(f"no δ-state at offset {offset}: prefill from restorable_offset()")
            return self._zeros(batch) if self.latest is None else self.latest
        i = self._run_at(offset)
        if i is None:
            if offset == 0:
                return self._zeros(batch)
            raise MissingDeltaState(f"no δ-state at offset {offset}: prefill from restorable_offset()")
        return self.kept[:, i]

    def restorable(self, offset: int) -> int:
        """The largest offset ≤ `offset` whose state is known."""
        if offset >= self.recorded and self.known:
            return offset
        i = bisect.bisect_right(self.starts, offset) - 1
        return 0 if i < 0 else min(offset, self.ends[i])

    def push(self, start: int, state: mx.array, marks: frozenset[int]) -> None:
        """Record the state after token start+1 (state: [B, *state_shape]), as decoding does."""
        self._advance_to(start, state.shape[0], marks)
        self.latest, self.recorded = state, start + 1
        if _kept_offset(start + 1, marks):
            self._append(start + 1, start + 1, state[:, None])

    def store(self, start: int, states: mx.array, marks: frozenset[int]) -> None:
        """Record the states after tokens start+1 .. start+T (states: [B, T, *state_shape])."""
        self._advance_to(start, states.shape[0], marks)
        T = states.shape[1]
        offsets = [o for o in range(start + 1, start + T + 1) if _kept_offset(o, marks)]
        if offsets:
            picked = states[:, mx.array([o - start - 1 for o in offsets])]
            self._append_many(offsets, picked)
        self.latest, self.recorded = states[:, -1], start + T

    def set_current(self, offset: int, state: mx.array) -> None:
        """Replace the state at `offset` (a memory write or a restored state) and keep it."""
        if self.known:
            self._advance_to(offset, state.shape[0], frozenset(), keep_current=False)
        state = state.astype(mx.float32)
        if self.ends and self.ends[-1] >= offset:
            self._cut_runs(offset - 1)
        self._append(offset, offset, state[:, None])
        self.latest, self.recorded, self.known = state, offset, True

    def trim(self, offset: int) -> None:
        """Forget the states after `offset` tokens."""
        if offset >= self.recorded:
            return
        self._cut_runs(offset)
        self.recorded = offset
        if self.ends and self.ends[-1] == offset:
            self.latest, self.known = self.kept[:, len(self.ends) - 1], True
        else:
            self.latest, self.known = None, offset == 0

    @property
    def nbytes(self) -> int:
        """Bytes held: the kept states' buffer and the latest state."""
        kept = 0 if self.kept is None else self.kept.nbytes
        return kept + (0 if self.latest is None else self.latest.nbytes)

    @property
    def state(self) -> tuple:
        """Arrays and scalars only, so that mlx-lm's save_prompt_cache can write them."""
        n = len(self.starts)
        runs = mx.array(np.array([self.starts, self.ends], dtype=np.int32).reshape(2, n))
        kept = None if self.kept is None else self.kept[:, :n]
        return kept, runs, self.latest, self.recorded, self.known, mx.array(self.state_shape)

    @classmethod
    def from_state(cls, state: tuple) -> "DeltaRecord":
        """A record rebuilt from `state` (as saved, or as loaded by mlx-lm)."""
        kept, runs, latest, recorded, known, shape = state
        record = cls(tuple(int(d) for d in np.array(shape).tolist()))
        record.kept, record.latest = kept, latest
        starts, ends = np.array(runs).reshape(2, -1).tolist()
        record.starts, record.ends = [int(s) for s in starts], [int(e) for e in ends]
        record.recorded, record.known = int(recorded), bool(known)
        return record

    def _advance_to(self, offset: int, batch: int, marks: frozenset[int], keep_current: bool = True) -> None:
        # The state is constant from `recorded` to `offset`: keep that stretch as one run.
        if offset < self.recorded:
            raise ValueError(f"δ-states are recorded up to {self.recorded}; cannot write at {offset}")
        if not self.known:
            raise MissingDeltaState(f"no δ-state at offset {offset}: prefill from restorable_offset()")
        stretch = offset > self.recorded or (keep_current and offset in marks)
        if not stretch:
            return
        current = self._zeros(batch) if self.latest is None else self.latest
        if self.ends and self.ends[-1] == self.recorded:
            self.ends[-1] = offset  # the last kept run is this state: extend it
        else:
            self._append(self.recorded, offset, current[:, None])
        self.recorded = offset

    def _append(self, start: int, end: int, states: mx.array) -> None:
        self._append_many([start], states, ends=[end])

    def _append_many(self, starts: list[int], states: mx.array, ends: list[int] | None = None) -> None:
        n, k = len(self.starts), len(starts)
        self._ensure_capacity(n + k, states.shape[0])
        self.kept[:, n : n + k] = states
        self.starts.extend(starts)
        self.ends.extend(ends if ends is not None else starts)

    def _cut_runs(self, offset: int) -> None:
        """Drop runs that start after `offset`; the run holding it now ends there."""
        n = bisect.bisect_right(self.starts, offset)
        del self.starts[n:], self.ends[n:]
        if self.ends and self.ends[-1] > offset:
            self.ends[-1] = offset

    def _run_at(self, offset: int) -> int | None:
        i = bisect.bisect_right(self.starts, offset) - 1
        return i if i >= 0 and offset <= self.ends[i] else None

    def _ensure_capacity(self, needed: int, batch: int) -> None:
        if self.kept is not None and needed <= self.kept.shape[1]:
            return
        have = 0 if self.kept is None else self.kept.shape[1]
        extra = -(-(needed - have) // DELTA_RECORD_STEP) * DELTA_RECORD_STEP
        grow = mx.zeros((batch, extra, *self.state_shape), dtype=mx.float32)
        self.kept = grow if self.kept is None else mx.concatenate([self.kept, grow], axis=1)

    def _zeros(self, batch: int) -> mx.array:
        return mx.zeros((batch, *self.state_shape), dtype=mx.float32)


def _kept_offset(offset: int, marks: frozenset[int]) -> bool:
    return offset % DELTA_RECORD_INTERVAL == 0 or offset in marks


class DeltaLayerCache:
    """What the δ attention needs from its cache, whatever stores the K/V."""

    controls: DeltaControls
    record: DeltaRecord
    offset: int

    @property
    def state_shape(self) -> tuple[int, ...]:
        """Per-batch-item δ-state shape."""
        return self.record.state_shape

    def state_at(self, offset: int, batch: int) -> mx.array:
        """The δ-state after `offset` tokens (zeros before anything was written)."""
        return self.record.state_at(offset, batch)

    def current_state(self, batch: int = 1) -> mx.array:
        """The δ-state after every cached token."""
        return self.state_at(self.offset, batch)

    def push_state(self, start: int, state: mx.array) -> None:
        """Record the state after token start+1 (state: [B, *state_shape]), as decoding does."""
        self.record.push(start, state, self.controls.keep)

    def store_states(self, start: int, states: mx.array) -> None:
        """Record the states after tokens start+1 .. start+T (states: [B, T, *state_shape])."""
        self.record.store(start, states, self.controls.keep)

    def set_current_state(self, state: mx.array) -> None:
        """Replace the state at the current offset (a context-only write or a restored state)."""
        self.record.set_current(self.offset, state)

    def restorable_offset(self, offset: int) -> int:
        """The largest offset ≤ `offset` that a trim restores exactly."""
        return self.record.restorable(min(offset, self.offset))

    @property
    def delta_nbytes(self) -> int:
        """Bytes of the δ record alone."""
        return self.record.nbytes


class DeltaKVCache(DeltaLayerCache, PrefixedKV, KVCache):
    """mlx-lm's KVCache plus the layer's δ record; it can start from a shared prefix."""

    def __init__(self, state_shape: tuple[int, ...], controls: DeltaControls):
        KVCache.__init__(self)
        self.controls = controls
        self.record = DeltaRecord(state_shape)

    def trim(self, n: int) -> int:
        trimmed = PrefixedKV.trim(self, n)
        self.record.trim(self.offset)
        return trimmed

    @property
    def state(self):
        return self.keys, self.values, self.offset, *self.record.state

    @state.setter
    def state(self, v):
        self.keys, self.values, self.offset = v[:3]
        self.record = DeltaRecord.from_state(v[3:])
        if not hasattr(self, "controls"):
            self.controls = DeltaControls()

    @property
    def nbytes(self):
        return KVCache.nbytes.fget(self) + self.record.nbytes

    def to_quantized(self, group_size: int = 64, bits: int = 4) -> "QuantizedDeltaKVCache":
        """The same cache with K/V in mlx-lm's quantized format; the δ record moves over unchanged."""
        self.unshare()  # the quantized cache holds every token itself
        quantized = QuantizedDeltaKVCache(self.state_shape, self.controls, group_size=group_size, bits=bits)
        plain = KVCache.to_quantized(self, group_size=group_size, bits=bits)
        quantized.keys, quantized.values, quantized.offset = plain.keys, plain.values, plain.offset
        quantized.record = self.record
        return quantized


class QuantizedDeltaKVCache(DeltaLayerCache, PrefixedKV, QuantizedKVCache):
    """mlx-lm's QuantizedKVCache plus the layer's δ record (which stays float32); it can start from a
    shared prefix."""

    def __init__(self, state_shape: tuple[int, ...], controls: DeltaControls, group_size: int = 64, bits: int = 8):
        QuantizedKVCache.__init__(self, group_size=group_size, bits=bits)
        self.controls = controls
        self.record = DeltaRecord(state_shape)

    def trim(self, n: int) -> int:
        trimmed = PrefixedKV.trim(self, n)
        self.record.trim(self.offset)
        return trimmed

    @property
    def state(self):
        return self.keys, self.values, self.offset, self.group_size, self.bits, *self.record.state

    @state.setter
    def state(self, v):
        self.keys, self.values, self.offset, self.group_size, self.bits = v[:5]
        self.record = DeltaRecord.from_state(v[5:])
        if not hasattr(self, "controls"):
            self.controls = DeltaControls()

    @property
    def nbytes(self):
        kv = 0 if self.keys is None else QuantizedKVCache.nbytes.fget(self)
        return kv + self.record.nbytes
