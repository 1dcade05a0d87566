"""Per-layer cache for δ layers: mlx-lm's KV cache plus the δ-state after every cached token.

Keeping the state at every offset (36 × 8 × 8 floats per token for Qwen3-4B, about 6 % of
its KV cache) makes `trim` exact at any position, so prompt-cache reuse, rollback and
mlx-lm's own prompt-cache helpers work on δ models unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache

# Decoded states wait in a queue and are written to the buffer together: a write per token and
# layer costs about a quarter of the rest of the δ decode step on small models.
QUEUE_LIMIT = 64


@dataclass
class DeltaControls:
    """Per-call switches shared by all layers of one prompt cache."""

    enabled: bool = True
    write: bool = True
    message_ids: np.ndarray | None = None  # [B, T_call] for message-mean writes; -1 = not written


class DeltaKVCache(KVCache):
    """KV cache whose `states[:, t]` is the δ-state after the first t tokens (t = 0: before any)."""

    def __init__(self, state_shape: tuple[int, ...], controls: DeltaControls):
        super().__init__()
        self.state_shape = state_shape  # per batch item: (r, r) or (heads, r, r)
        self.controls = controls
        self.states: mx.array | None = None  # [B, capacity, *state_shape], float32
        self.recorded = 0  # states[:, :recorded + 1] are valid; δ-off calls leave the state as is
        # The state at `recorded`, kept apart from the buffer: handing out a view of the buffer
        # would stop the next store from updating it in place (a full copy per decoded token).
        self.latest: mx.array | None = None
        self._queued: list[mx.array] = []  # states after the last len(_queued) recorded tokens

    def state_at(self, offset: int, batch: int) -> mx.array:
        """The δ-state after `offset` tokens (zeros before anything was written)."""
        if self.states is None:
            return mx.zeros((batch, *self.state_shape), dtype=mx.float32)
        if offset >= self.recorded:
            return self.latest
        self._flush()
        return self.states[:, offset]

    def current_state(self, batch: int = 1) -> mx.array:
        """The δ-state after every cached token."""
        return self.state_at(self.offset, batch)

    def push_state(self, start: int, state: mx.array) -> None:
        """Record the state after token start+1 (state: [B, *state_shape]), as decoding does."""
        if self.states is None or start != self.recorded:
            self.store_states(start, state[:, None])
            return
        self._queued.append(state)
        self.recorded += 1
        self.latest = state
        if len(self._queued) == QUEUE_LIMIT:
            self._flush()

    def store_states(self, start: int, states: mx.array) -> None:
        """Record the states after tokens start+1 .. start+T (states: [B, T, *state_shape])."""
        self._flush()
        self._fill_gap(start, states.shape[0])
        end = start + states.shape[1]
        self._ensure_capacity(end + 1, states.shape[0])
        self.states[:, start + 1 : end + 1] = states
        self.recorded = end
        self.latest = states[:, -1]

    def set_current_state(self, state: mx.array) -> None:
        """Replace the state at the current offset (a context-only write or a restored state)."""
        self._flush()
        self._fill_gap(self.offset, state.shape[0])
        self._ensure_capacity(self.offset + 1, state.shape[0])
        self.latest = state.astype(mx.float32)
        self.states[:, self.offset] = self.latest
        self.recorded = self.offset

    def trim(self, n: int) -> int:
        self._flush()
        trimmed = super().trim(n)
        if self.states is not None and self.offset < self.recorded:
            self.recorded = self.offset
            self.latest = self.states[:, self.offset]
        return trimmed

    def _flush(self) -> None:
        if not self._queued:
            return
        first = self.recorded - len(self._queued) + 1
        self._ensure_capacity(self.recorded + 1, self._queued[0].shape[0])
        self.states[:, first : self.recorded + 1] = mx.stack(self._queued, axis=1)
        self._queued = []

    def _fill_gap(self, offset: int, batch: int) -> None:
        # Tokens processed with δ off did not change the state: carry it forward to `offset`.
        if self.states is None:
            self._ensure_capacity(offset + 1, batch)
            self.latest = mx.zeros((batch, *self.state_shape), dtype=mx.float32)
            self.recorded = offset
        elif offset > self.recorded:
            self._ensure_capacity(offset + 1, batch)
            gap = offset - self.recorded
            self.states[:, self.recorded + 1 : offset + 1] = mx.broadcast_to(
                self.latest[:, None], (batch, gap, *self.state_shape)
            )
            self.recorded = offset

    def _ensure_capacity(self, needed: int, batch: int) -> None:
        if self.states is None:
            capacity = -(-needed // self.step) * self.step
            self.states = mx.zeros((batch, capacity, *self.state_shape), dtype=mx.float32)
        elif needed > self.states.shape[1]:
            extra = -(-(needed - self.states.shape[1]) // self.step) * self.step
            grow = mx.zeros((batch, extra, *self.state_shape), dtype=mx.float32)
            self.states = mx.concatenate([self.states, grow], axis=1)

    @property
    def state(self):
        self._flush()
        return self.keys, self.values, self.offset, self.states, self.recorded, self.latest

    @state.setter
    def state(self, v):
        self.keys, self.values, self.offset, self.states, self.recorded, self.latest = v
        self._queued = []

    @property
    def nbytes(self):
        return super().nbytes + (0 if self.states is None else self.states.nbytes)

    def to_quantized(self, group_size: int = 64, bits: int = 4):
        raise NotImplementedError("δ-mem caches keep float K/V; KV quantization is not supported")
