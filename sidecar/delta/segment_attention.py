"""Attention over [shared prefix | own tokens]: the prefix's K/V held once, read once per step.

A prefill chunk (several queries) joins the two segments into one transient, dequantized when the
cache is quantized, and runs the fused float kernel: the same arithmetic as a contiguous cache.
A decode step (one query per row) never copies the prefix: the queries of every row that shares it
are stacked, so its keys and values are read once for all of them, and each row's own segment is
attended apart. Both parts' scores are combined as one softmax over their concatenation would:
weights exp(s − m) with m the row's largest score over both segments, one sum, one division.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from sidecar.delta.prefixed_kv import KvParts, PrefixSegment

Quantization = tuple[int, int] | None  # (group size, bits) of quantized K/V, None for float


def prefill_over_prefix(
    queries: mx.array, cache: Any, scale: float, mask: Any
) -> mx.array:
    """Several queries of one row over its whole cache (prefix and own tokens, the new ones included)."""
    keys, values = cache.kv_range(0, cache.offset)
    if isinstance(keys, tuple):
        keys, values = (mx.dequantize(*kv, group_size=cache.group_size, bits=cache.bits) for kv in (keys, values))
    return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)


def decode_over_prefix(
    queries: mx.array,
    segment: PrefixSegment,
    own: list[tuple[KvParts, KvParts]],
    scale: float,
    quantization: Quantization,
) -> mx.array:
    """One query per row (queries: [R, heads, 1, head_dim]) for R rows that share `segment`; `own[i]` is
    row i's own keys and values (its new token included). Returns [R, heads, 1, head_dim]."""
    R, n_heads, _, head_dim = queries.shape
    n_kv = _kv_heads(segment.keys)
    group = n_heads // n_kv
    # Rows and query heads of one KV head side by side: [1, kv heads, R · group, head_dim].
    q = (queries * scale).reshape(R, n_kv, group, head_dim).transpose(1, 0, 2, 3).reshape(1, n_kv, R * group, head_dim)
    rows = [slice(i * group, (i + 1) * group) for i in range(R)]
    shared_scores = _scores(q, segment.keys, quantization).astype(mx.float32)
    own_scores = [_scores(q[:, :, r], keys, quantization).astype(mx.float32) for r, (keys, _) in zip(rows, own)]
    top = mx.maximum(
        mx.max(shared_scores, axis=-1, keepdims=True),
        mx.concatenate([mx.max(s, axis=-1, keepdims=True) for s in own_scores], axis=2),
    )
    shared_weights = mx.exp(shared_scores - top)
    own_weights = [mx.exp(s - top[:, :, r]) for r, s in zip(rows, own_scores)]
    total = mx.sum(shared_weights, axis=-1, keepdims=True) + mx.concatenate(
        [mx.sum(w, axis=-1, keepdims=True) for w in own_weights], axis=2
    )
    dtype = queries.dtype
    # Normalized before the weighted sums, as a softmax is: the same rounding as a contiguous cache's.
    own_out = [
        _weighted((w / total[:, :, r]).astype(dtype), values, quantization)
        for r, w, (_, values) in zip(rows, own_weights, own)
    ]
    out = _weighted((shared_weights / total).astype(dtype), segment.values, quantization)
    out = out + mx.concatenate(own_out, axis=2)
    return out.reshape(n_kv, R, group, head_dim).transpose(1, 0, 2, 3).reshape(R, n_heads, 1, head_dim)


def _scores(q: mx.array, keys: KvParts, quantization: Quantization) -> mx.array:
    if quantization is None:
        return q @ keys.swapaxes(-1, -2)  # type: ignore[union-attr]
    group_size, bits = quantization
    return mx.quantized_matmul(q, *keys, transpose=True, group_size=group_size, bits=bits)


def _weighted(weights: mx.array, values: KvParts, quantization: Quantization) -> mx.array:
    if quantization is None:
        return weights @ values
    group_size, bits = quantization
    return mx.quantized_matmul(weights, *values, transpose=False, group_size=group_size, bits=bits)


def _kv_heads(keys: KvParts) -> int:
    return (keys[0] if isinstance(keys, tuple) else keys).shape[1]
