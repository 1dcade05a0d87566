"""Sampling for the rows of a decode batch: greedy rows take the argmax, sampled rows use their own key.

A sampled row draws from its own `mx.random` key (from its request's `seed`, else a random one) and
splits it at every token, so its stream depends on nothing but its own logits: the global random
state and the other rows of the batch never move it.
"""

from __future__ import annotations

import secrets

import mlx.core as mx
from mlx_lm.sample_utils import apply_top_p


class RowSampler:
    """Temperature and top-p (nucleus) sampling for one row, with the row's own random key."""

    def __init__(self, temperature: float, top_p: float, seed: int | None):
        self.temperature = temperature
        self.top_p = top_p
        self._key = mx.random.key(seed if seed is not None else secrets.randbits(63))

    def __call__(self, logits: mx.array) -> mx.array:
        """One token [1] from logits [1, vocab]."""
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        if 0 < self.top_p < 1:
            logprobs = apply_top_p(logprobs, self.top_p)
        self._key, key = mx.random.split(self._key)
        return mx.random.categorical(logprobs * (1 / self.temperature), key=key)


def row_sampler(temperature: float, top_p: float, seed: int | None) -> RowSampler | None:
    """The sampler of a request, or None for greedy decoding (temperature 0)."""
    return RowSampler(temperature, top_p, seed) if temperature > 0 else None


def sample_rows(logits: mx.array, samplers: list[RowSampler | None]) -> mx.array:
    """One token per row [B] from logits [B, vocab]: the argmax, or the row's own sampler."""
    greedy = mx.argmax(logits, axis=-1)
    if all(sampler is None for sampler in samplers):
        return greedy
    picks = [greedy[i : i + 1] if s is None else s(logits[i : i + 1]) for i, s in enumerate(samplers)]
    return mx.concatenate(picks).astype(greedy.dtype)
