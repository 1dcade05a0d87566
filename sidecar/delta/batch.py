"""One decoding step for B rows at once, each row with its own caches (its KV and its δ-state).

Everything but attention runs batched: the embedding, the q/k/v and δ projections, RoPE at each
row's own position, o_proj and the MLP. Attention runs row by row, each row on its own cache, so
rows of different lengths need no padding and no mask, and a row joins or leaves the batch without
copying anything: its caches stay the session's own mlx-lm caches (float or quantized K/V, with a
δ record in δ layers). The δ-states of all rows are stepped together; a δ-state is written once
per token of its own row, and rows with δ off get no Δ terms and keep their state.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from sidecar.delta.attention import DeltaAttention, PlainAttention, attend_rows

# Models whose decoder blocks this module runs itself (their layers are the standard
# norm → attention → residual → norm → MLP → residual block).
BATCHED_MODEL_TYPES = ("qwen2", "qwen3")


def decode_rows(model: nn.Module, tokens: mx.array, caches: list[list[Any]], delta: list[bool]) -> mx.array:
    """Next-token logits [B, vocab] for B rows of one input token each; row i reads and writes only caches[i].

    `delta[i]` says whether row i runs with δ-mem (its caches' controls must agree when B is 1:
    a single row runs the model's own forward, unchanged).
    """
    if len(caches) == 1 or getattr(getattr(model, "args", None), "model_type", None) not in BATCHED_MODEL_TYPES:
        return mx.concatenate([model(tokens[i : i + 1, None], cache=cache)[:, -1] for i, cache in enumerate(caches)])
    inner = model.model
    h = inner.embed_tokens(tokens[:, None])
    offsets = mx.array([cache[0].offset for cache in caches])
    for index, layer in enumerate(inner.layers):
        layer_caches = [cache[index] for cache in caches]
        h = h + _attention(layer.self_attn, layer.input_layernorm(h), layer_caches, offsets, delta)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    h = inner.norm(h)
    logits = inner.embed_tokens.as_linear(h) if model.args.tie_word_embeddings else model.lm_head(h)
    return logits[:, -1]


def _attention(attention: nn.Module, x: mx.array, caches: list[Any], offsets: mx.array, delta: list[bool]) -> mx.array:
    if not isinstance(attention, DeltaAttention):
        base = attention.base if isinstance(attention, PlainAttention) else attention
        return attend_rows(base, x, caches, offsets, {})
    deltas = attention.decode_rows(x, caches, delta) if any(delta) else {}
    return attend_rows(attention.base, x, caches, offsets, deltas)
