"""A Qwen3 / Qwen2 attention module with δ-mem read and write wrapped around it.

For each token the memory is read before it is written; the read adds (α/r)·W_Δq·read to the
raw q_proj output (before q_norm and RoPE) and (α/r)·W_Δo·read to the o_proj output.
K and V are corrected only if the adapter's `delta_heads` ask for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.base import scaled_dot_product_attention

from sidecar.delta.cache import DeltaControls, DeltaLayerCache
from sidecar.delta.config import DeltaMemConfig
from sidecar.delta.scan import scan
from sidecar.delta.segment_attention import decode_over_prefix, prefill_over_prefix

_STATELESS = DeltaControls()


@dataclass(frozen=True)
class DeltaLayout:
    """Which Δ terms the fused Δ output holds, in order, and their widths."""

    heads: tuple[str, ...]
    sizes: tuple[int, ...]

    def split(self, fused: mx.array) -> dict[str, mx.array]:
        """Cut the fused Δ output into one array per head."""
        out, start = {}, 0
        for head, size in zip(self.heads, self.sizes):
            out[head] = fused[..., start : start + size]
            start += size
        return out


class DeltaAttention(nn.Module):
    """Wraps one attention module; parameters are the fused memory projection and the Δ maps."""

    def __init__(self, base: nn.Module, config: DeltaMemConfig, tensors: dict[str, np.ndarray]):
        super().__init__()
        self.base = base
        self.config = config
        parts = ["memory_q_proj", "memory_k_proj", "memory_v_proj", "beta_proj"]
        biases = [np.zeros(3 * config.memory_dim, np.float32), tensors["beta_bias"]]
        if not config.couple_lambda:
            parts.append("lambda_proj")
            biases.append(tensors["lambda_bias"])
        # One matmul produces q, k, v and the gate logits; stored as [in, out], the bias as a row.
        self.memory_weight = mx.array(np.concatenate([tensors[p] for p in parts]).T.astype(np.float32))
        self.memory_bias = mx.array(np.concatenate(biases).astype(np.float32)[None])
        # The α/r scale is folded into the Δ maps, concatenated as [memory_dim, sum of outputs]
        # so that one matmul gives every Δ term.
        maps = [(config.scale * tensors[f"delta_{h}_proj"]).T for h in config.delta_heads]
        self.delta_weight = mx.array(np.concatenate(maps, axis=1).astype(np.float32))
        self.delta_layout = DeltaLayout(config.delta_heads, tuple(m.shape[1] for m in maps))

    @property
    def state_shape(self) -> tuple[int, ...]:
        """Per-batch-item state shape: [r, r], or [heads, r, r] for several state heads."""
        r, H = self.config.rank, self.config.num_state_heads
        return (r, r) if H == 1 else (H, r, r)

    def __call__(self, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
        delta_cache = cache if isinstance(cache, DeltaLayerCache) else None
        controls = delta_cache.controls if delta_cache is not None else _STATELESS
        if not controls.enabled:
            return _attend(self.base, x, mask, cache, {})

        B, T, _ = x.shape
        start = cache.offset if cache is not None else 0
        if delta_cache is not None:
            state = delta_cache.state_at(start, B)
        else:
            state = mx.zeros((B, *self.state_shape), dtype=mx.float32)
        ids = _message_ids(controls.message_ids, B, T) if self._message_mean else None

        states = None  # [B, T, *state_shape] to record, when not recorded already
        if ids is not None and controls.write:
            reads, states = self._message_mean_write(x, self._heads(state), ids)
            states = states.reshape(B, T, *self.state_shape)
            deltas = _deltas(self.delta_layout, reads, self.delta_weight, x.dtype)
        elif controls.write and T == 1:
            deltas, state = self._step(x, state)
            if delta_cache is not None:
                delta_cache.push_state(start, state)
        elif controls.write:
            scan_run = _prefill_scan(self.config, self.delta_layout)
            deltas, states = scan_run(x, self.memory_weight, self.memory_bias, state, self.delta_weight)
        else:
            reads = _read_only(self._heads(state), self._memory_inputs(x)[0])
            deltas = _deltas(self.delta_layout, reads, self.delta_weight, x.dtype)
        if delta_cache is not None and states is not None:
            delta_cache.store_states(start, states)
        return _attend(self.base, x, mask, cache, deltas)

    def decode_rows(self, x: mx.array, caches: list[DeltaLayerCache], enabled: list[bool]) -> dict[str, mx.array]:
        """One token for each of B rows (x: [B, 1, d]), each row with its own cache: the Δ terms.

        The rows' states are stepped together; each δ row's new state goes to its own cache, and
        the Δ terms of rows with δ off are zero, so those rows run the plain attention.
        """
        states = mx.concatenate([cache.state_at(cache.offset, 1) for cache in caches])
        deltas, new_states = self._step(x, states)
        for cache, on, state in zip(caches, enabled, mx.split(new_states, len(caches))):
            if on:
                cache.push_state(cache.offset, state)
        if all(enabled):
            return deltas
        on_rows = mx.array(enabled, dtype=x.dtype)[:, None, None]
        return {head: delta * on_rows for head, delta in deltas.items()}

    def _step(self, x: mx.array, state: mx.array) -> tuple[dict[str, mx.array], mx.array]:
        step = _decode_step(self.config, self.delta_layout)
        return step(x, self.memory_weight, self.memory_bias, state, self.delta_weight)

    def _heads(self, state: mx.array) -> mx.array:
        """A stored state [B, *state_shape] as [B, heads, r, r]."""
        return state.reshape(state.shape[0], self.config.num_state_heads, self.config.rank, self.config.rank)

    @property
    def _message_mean(self) -> bool:
        return self.config.memory_write_granularity == "message_mean"

    def _memory_inputs(self, x: mx.array) -> tuple[mx.array, ...]:
        return _memory_inputs(self.config, x, self.memory_weight, self.memory_bias)

    def _message_mean_write(self, x: mx.array, state: mx.array, ids: np.ndarray):
        """SSW: every token reads the call's start state; one write per message (its mean input)."""
        slots = int(ids.max()) + 1
        onehot = (ids[:, None, :] == np.arange(slots)[None, :, None]).astype(np.float32)
        counts = onehot.sum(-1, keepdims=True)
        weights = mx.array(onehot / np.maximum(counts, 1.0))  # [B, slots, T]
        means = weights @ x.astype(mx.float32)  # [B, slots, d]
        q, k, v, keep, erase, write = self._memory_inputs(means)
        present = mx.array((counts[..., 0] > 0).astype(np.float32))[:, None, :, None]
        # An id absent from this call is an identity step: keep 1, erase 0, write 0.
        keep = present * keep + (1.0 - present)
        erase, write = present * erase, present * write
        _, message_states = scan(q, k, v, keep, erase, write, state, all_states=True)
        reads = _read_only(state, self._memory_inputs(x)[0])
        history = mx.concatenate([state[:, :, None], message_states], axis=2)  # [B, H, slots+1, r, r]
        index = mx.array(_completed_messages(ids, slots))  # [B, T]
        states = mx.take_along_axis(history, index[:, None, :, None, None], axis=2)
        return reads, states.swapaxes(1, 2)


def _project(config: DeltaMemConfig, x: mx.array, weight: mx.array, bias: mx.array) -> tuple[mx.array, ...]:
    """qk [B, T, 2, H, r] (tanh, unit length if normalize_qk), v [B, T, H, r], keep/erase/write [B, T, H, g]."""
    B, T, _ = x.shape
    H, r = config.num_state_heads, config.rank
    proj = x.astype(mx.float32) @ weight + bias
    qk, v, keep, erase, write = _activations(config, proj, (B, T, 2, H, r), lambda width: (B, T, H, width))
    if config.normalize_qk:
        # x / max(|x|, 1e-6), written with one reduction for q and k together.
        qk = qk * mx.rsqrt(mx.maximum(mx.sum(qk * qk, axis=-1, keepdims=True), 1e-12))
    return qk, v, keep, erase, write


def _activations(
    config: DeltaMemConfig,
    proj: mx.array,
    qk_shape: tuple[int, ...],
    row_shape: Callable[[int], tuple[int, ...]],
) -> tuple[mx.array, ...]:
    """tanh(q, k) in `qk_shape`; v and the keep/erase/write gates in `row_shape(width)`."""
    D, G = config.memory_dim, config.gate_dim
    g = config.rank if config.rankwise_gates else 1
    qk = mx.tanh(proj[..., : 2 * D].reshape(qk_shape))
    v = proj[..., 2 * D : 3 * D].reshape(row_shape(config.rank))
    beta = mx.sigmoid(proj[..., 3 * D : 3 * D + G].reshape(row_shape(g)))
    if config.couple_lambda:
        lam = 1.0 - beta
    else:
        lam = mx.sigmoid(proj[..., 3 * D + G : 3 * D + 2 * G].reshape(row_shape(g)))
    if config.state_update_mode == "standard":
        return qk, v, lam, beta, beta
    if config.state_update_mode == "lambda_outside":
        return qk, v, lam, lam * beta, beta
    return qk, v, mx.ones_like(beta), beta, beta  # no_lambda


def _memory_inputs(
    config: DeltaMemConfig, x: mx.array, weight: mx.array, bias: mx.array
) -> tuple[mx.array, ...]:
    """q, k, v [B, H, T, r] and keep, erase, write [B, H, T, g]: the scan's layout."""
    qk, v, keep, erase, write = _project(config, x, weight, bias)
    q, k = qk[:, :, 0], qk[:, :, 1]
    return tuple(t.swapaxes(1, 2) for t in (q, k, v, keep, erase, write))


@lru_cache(maxsize=None)
def _decode_step(config: DeltaMemConfig, layout: DeltaLayout) -> Callable[..., tuple[dict[str, mx.array], mx.array]]:
    """One token: the Δ terms and the new state [B, *state shape], as one compiled function.

    Shaped for few primitives, because at one token each costs more than its arithmetic: views
    that broadcast q, k, v and the gates over the state, and one reduction that gives S q, S k,
    |q|² and |k|² together.
    """
    H, r = config.num_state_heads, config.rank
    # Selects, along the second axis, S·x (index 0) or x·x (index 1) before the row sums.
    with_state = mx.array(np.array([1, 0], np.float32).reshape(2, 1, 1, 1, 1))
    state_shape = (r, r) if H == 1 else (H, r, r)

    def run(x, weight, bias, state, delta_weight):
        B = x.shape[0]
        proj = mx.addmm(bias, x.astype(mx.float32).reshape(B, -1), weight)
        # Axes: batch, S·x or x·x, q or k, state head, state row, state column.
        qk, v, keep, erase, write = _activations(
            config, proj, (B, 1, 2, H, 1, r), lambda width: (B, 1, 1, H, width, 1)
        )
        s = state.reshape(B, 1, 1, H, r, r)
        sums = (with_state * (s * qk) + (1 - with_state) * (qk * qk)).sum(-1, keepdims=True)
        if config.normalize_qk:
            inv_q, inv_k = (mx.rsqrt(mx.maximum(sums[:, 1:, i : i + 1], 1e-12)) for i in (0, 1))  # 1 / max(|x|, 1e-6)
        else:
            inv_q = inv_k = 1.0
        k_row = qk[:, :, 1:] * inv_k
        new_state = keep * s + (write * v - erase * sums[:, :1, 1:] * inv_k) * k_row
        read = sums[:, :1, :1] * inv_q  # S q / max(|q|, 1e-6)
        fused = (read.reshape(B, H * r) @ delta_weight).astype(x.dtype)
        return layout.split(fused.reshape(B, 1, -1)), new_state.reshape(B, *state_shape)

    return mx.compile(run)


@lru_cache(maxsize=None)
def _prefill_scan(config: DeltaMemConfig, layout: DeltaLayout) -> Callable[..., tuple[dict[str, mx.array], mx.array]]:
    """A run of tokens: the Δ terms and the state after each token [B, T, *state shape], compiled."""
    H, r = config.num_state_heads, config.rank

    def run(x, weight, bias, state, delta_weight):
        B, T, _ = x.shape
        reads, states = scan(*_memory_inputs(config, x, weight, bias), state.reshape(B, H, r, r), all_states=True)
        deltas = _deltas(layout, reads, delta_weight, x.dtype)
        return deltas, states.swapaxes(1, 2).reshape(B, T, *((r, r) if H == 1 else (H, r, r)))

    return mx.compile(run)


def _read_only(state: mx.array, q: mx.array) -> mx.array:
    """Reads [B, H, T, r] of every token from one fixed state."""
    return (state[:, :, None] @ q[..., None])[..., 0]


def _deltas(layout: DeltaLayout, reads: mx.array, delta_weight: mx.array, dtype: mx.Dtype) -> dict[str, mx.array]:
    """The Δ terms, one per δ head, from reads [B, H, T, r]: one matmul, then cut."""
    B, H, T, r = reads.shape
    fused = reads.swapaxes(1, 2).reshape(B, T, H * r) @ delta_weight
    return layout.split(fused.astype(dtype))


def _attend(base: nn.Module, x: mx.array, mask: Any, cache: Any, deltas: dict[str, mx.array]) -> mx.array:
    """The plain Qwen3/Qwen2 attention with Δ terms added at the reference's points."""
    queries, keys, values = _project_qkv(base, x, cache.offset if cache is not None else 0, deltas)
    if cache is not None:
        keys, values = cache.update_and_fetch(keys, values)
    output = attention(queries, keys, values, cache, base.scale, mask)
    return _project_out(base, output, deltas)


def attention(queries: mx.array, keys: Any, values: Any, cache: Any, scale: float, mask: Any) -> mx.array:
    """mlx-lm's attention, except that several queries over a quantized cache attend in float.

    A prefill chunk dequantizes the layer's packed K/V (a transient the size of one layer's float
    K/V) and runs the fused float kernel: mlx-lm's quantized attention costs several times more for
    the same product there. One query (decode) keeps reading the packed bytes, the point of the
    format on Metal, where decoding is bound by memory bandwidth. A cache that starts from a shared
    prefix (`keys`, `values`: its own tokens only) attends over both segments (segment_attention.py).
    """
    if getattr(cache, "prefix", None) is not None:
        if queries.shape[2] > 1:
            return prefill_over_prefix(queries, cache, scale, mask)
        return decode_over_prefix(queries, cache.prefix, [(keys, values)], scale, _quantization(cache))
    if hasattr(cache, "bits") and queries.shape[2] > 1:
        keys, values = (mx.dequantize(*kv, group_size=cache.group_size, bits=cache.bits) for kv in (keys, values))
        return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)
    return scaled_dot_product_attention(queries, keys, values, cache=cache, scale=scale, mask=mask)


class PlainAttention(nn.Module):
    """A layer's own attention module run by `_attend` with no Δ terms: the same forward, bit for bit,
    with `attention`'s float prefill over quantized caches and its shared prefixes (installed by
    `api.wrap_plain_attention`)."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base

    def __call__(self, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
        return _attend(self.base, x, mask, cache, {})


def attend_rows(
    base: nn.Module, x: mx.array, caches: list[Any], offsets: mx.array, deltas: dict[str, mx.array]
) -> mx.array:
    """Attention for B rows of one token each (x: [B, 1, d]), every row on its own cache.

    Projections and RoPE (at each row's own offset) run batched; each row then attends to exactly
    its own keys and values, so rows of different lengths need no padding and no mask. Rows that start
    from the same shared prefix read its keys and values once, together.
    """
    queries, keys, values = _project_qkv(base, x, offsets, deltas)
    own = [cache.update_and_fetch(keys[i : i + 1], values[i : i + 1]) for i, cache in enumerate(caches)]
    outputs: list[mx.array | None] = [None] * len(caches)
    sharing: dict[int, list[int]] = {}  # rows that start from the same prefix segment
    for i, cache in enumerate(caches):
        if getattr(cache, "prefix", None) is None:
            outputs[i] = attention(queries[i : i + 1], *own[i], cache, base.scale, None)
        else:
            sharing.setdefault(id(cache.prefix), []).append(i)
    for rows in sharing.values():
        first = caches[rows[0]]
        stacked = queries[mx.array(rows)] if len(rows) > 1 else queries[rows[0] : rows[0] + 1]
        out = decode_over_prefix(stacked, first.prefix, [own[i] for i in rows], base.scale, _quantization(first))
        for n, i in enumerate(rows):
            outputs[i] = out[n : n + 1]
    return _project_out(base, mx.concatenate(outputs), deltas)


def _quantization(cache: Any) -> tuple[int, int] | None:
    return (cache.group_size, cache.bits) if hasattr(cache, "bits") else None


def _project_qkv(
    base: nn.Module, x: mx.array, offset: int | mx.array, deltas: dict[str, mx.array]
) -> tuple[mx.array, mx.array, mx.array]:
    """Queries, keys and values [B, heads, L, head_dim], Δ terms added, norms and RoPE applied."""
    B, L, _ = x.shape
    queries = _linear_plus(base.q_proj, x, deltas.get("q"))
    keys = _linear_plus(base.k_proj, x, deltas.get("k"))
    values = _linear_plus(base.v_proj, x, deltas.get("v"))
    queries = queries.reshape(B, L, base.n_heads, -1)
    keys = keys.reshape(B, L, base.n_kv_heads, -1)
    if hasattr(base, "q_norm"):
        queries, keys = base.q_norm(queries), base.k_norm(keys)
    queries, keys = queries.transpose(0, 2, 1, 3), keys.transpose(0, 2, 1, 3)
    values = values.reshape(B, L, base.n_kv_heads, -1).transpose(0, 2, 1, 3)
    return base.rope(queries, offset=offset), base.rope(keys, offset=offset), values


def _project_out(base: nn.Module, output: mx.array, deltas: dict[str, mx.array]) -> mx.array:
    B, _, L, _ = output.shape
    return _linear_plus(base.o_proj, output.transpose(0, 2, 1, 3).reshape(B, L, -1), deltas.get("o"))


def _linear_plus(linear: nn.Module, x: mx.array, extra: mx.array | None) -> mx.array:
    """linear(x) + extra; one fused multiply-add when the layer is a plain bias-free matrix."""
    if extra is None:
        return linear(x)
    if type(linear) is nn.Linear and "bias" not in linear:
        return mx.addmm(extra, x, linear.weight.T)
    return linear(x) + extra


def _message_ids(ids: np.ndarray | None, batch: int, length: int) -> np.ndarray | None:
    """The call's message ids, or None when the reference falls back to token writes."""
    if ids is None:
        return None
    ids = np.asarray(ids)
    if ids.shape != (batch, length) or not (ids >= 0).any():
        return None
    return ids.astype(np.int64)


def _completed_messages(ids: np.ndarray, slots: int) -> np.ndarray:
    """For each token, how many leading message slots have all their tokens at or before it."""
    B, T = ids.shape
    out = np.zeros((B, T), dtype=np.int32)
    for b in range(B):
        last = np.full(slots, -1)
        for m in range(slots):
            positions = np.nonzero(ids[b] == m)[0]
            last[m] = positions[-1] if positions.size else -1
        # Slot m is complete at token t once every slot ≤ m has ended by t.
        complete_at = np.maximum.accumulate(last)
        out[b] = np.searchsorted(complete_at, np.arange(T), side="right")
    return out
