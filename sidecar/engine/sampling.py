"""Sampling for the rows of a decode batch: greedy rows take the argmax, sampled rows use their own key.

A sampled row draws from its own `mx.random` key (from its request's `seed`, else a random one) and
splits it at every token, so its stream depends on nothing but its own logits: the global random
state and the other rows of the batch never move it. Rows with the same temperature and top-p are
sampled with one batched call (the keys split and drawn row by row inside it, by `mx.vmap`), which
gives each row the tokens it would get alone.
"""

from __future__ import annotations

import secrets

import mlx.core as mx
from mlx_lm.sample_utils import apply_top_p

# Row by row inside one call: each key is split, and each row drawn, as alone.
_split_keys = mx.vmap(mx.random.split)
_draw = mx.vmap(lambda logprobs, key: mx.random.categorical(logprobs, key=key))


class RowSampler:
    """Temperature and top-p (nucleus) sampling for one row, with the row's own random key."""

    def __init__(self, temperature: float, top_p: float, seed: int | None):
        self.temperature = temperature
        self.top_p = top_p
        self.key = mx.random.key(seed if seed is not None else secrets.randbits(63))

    @property
    def settings(self) -> tuple[float, float]:
        """What rows sampled in one call must share."""
        return self.temperature, self.top_p


def row_sampler(temperature: float, top_p: float, seed: int | None) -> RowSampler | None:
    """The sampler of a request, or None for greedy decoding (temperature 0)."""
    return RowSampler(temperature, top_p, seed) if temperature > 0 else None


def sample_rows(logits: mx.array, samplers: list[RowSampler | None]) -> mx.array:
    """One token per row [B] from logits [B, vocab]: the argmax, or a draw with the row's own key."""
    tokens = mx.argmax(logits, axis=-1)
    groups: dict[tuple[float, float], list[int]] = {}
    for i, sampler in enumerate(samplers):
        if sampler is not None:
            groups.setdefault(sampler.settings, []).append(i)
    for (temperature, top_p), rows in groups.items():
        index = mx.array(rows)
        drawn = _sample([samplers[i] for i in rows], logits[index], temperature, top_p)  # type: ignore[misc]
        tokens[index] = drawn.astype(tokens.dtype)
    return tokens


def _sample(samplers: list[RowSampler], logits: mx.array, temperature: float, top_p: float) -> mx.array:
    """Tokens [n] for n rows of shared settings; each sampler's key moves on by one split."""
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    if 0 < top_p < 1:
        logprobs = apply_top_p(logprobs, top_p)
    keys = _split_keys(mx.stack([s.key for s in samplers]))  # [n, 2, key]: the next key, this draw's
    for i, sampler in enumerate(samplers):
        sampler.key = keys[i, 0]
    return _draw(logprobs * (1 / temperature), keys[:, 1])
