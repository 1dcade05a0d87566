"""Batched sampling: rows drawn in one call get the tokens each row's own key gives it alone."""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.sample_utils import apply_top_p

from sidecar.engine.sampling import RowSampler, row_sampler, sample_rows


def _alone(key: mx.array, logits: mx.array, temperature: float, top_p: float) -> tuple[mx.array, int]:
    """One row sampled by itself (logits [vocab]) with its own key: its next key and its token."""
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    if 0 < top_p < 1:
        logprobs = apply_top_p(logprobs, top_p)
    key, draw = mx.random.split(key)
    return key, mx.random.categorical(logprobs * (1 / temperature), key=draw).item()


def test_rows_sampled_together_draw_what_each_row_draws_alone() -> None:
    # Greedy rows, two settings groups and a repeated seed, mixed in one batch, over several steps
    # (the keys must move on exactly as a row's own key does).
    settings = [None, (0.8, 1.0), (0.8, 1.0), (1.3, 0.9), None, (0.8, 1.0), (1.3, 0.9)]
    seeds = [None, 1, 2, 3, None, 1, 4]
    samplers = [None if s is None else RowSampler(s[0], s[1], seed) for s, seed in zip(settings, seeds)]
    keys = [None if s is None else mx.random.key(seed) for s, seed in zip(settings, seeds)]
    for step in range(4):
        logits = mx.random.normal((len(settings), 64), key=mx.random.key(100 + step)) * 3
        batched = sample_rows(logits, samplers).tolist()
        expected = []
        for i, s in enumerate(settings):
            if s is None:
                expected.append(mx.argmax(logits[i]).item())
            else:
                keys[i], token = _alone(keys[i], logits[i], *s)
                expected.append(token)
        assert batched == expected


def test_a_greedy_batch_takes_the_argmax() -> None:
    logits = mx.random.normal((3, 32), key=mx.random.key(0))
    assert row_sampler(0.0, 1.0, 5) is None
    assert sample_rows(logits, [None, None, None]).tolist() == mx.argmax(logits, axis=-1).tolist()
