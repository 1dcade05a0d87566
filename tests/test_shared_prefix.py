"""Sessions that start from a shared prefix by reference compute what a private contiguous copy does.

Each case builds one prefix cache, freezes it (`SharedPrefix`), and runs the same continuation on a
session that references it and on a private deep copy: prefill chunks, decode steps alone, decode
steps in a batch of mixed rows (sharing the prefix, private, no prefix at all; δ on and off), a row
joining mid-batch, and rollbacks into the prefix. Logits within 1e-5 + 1e-6 × |logit| (float32),
δ-states within 1e-6, the same greedy tokens; the referencing caches never copy the prefix's K/V.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.utils import load_model

from sidecar.delta import attach_delta_mem, delta_states
from sidecar.delta.api import delta_record_nbytes, make_cache, set_delta_controls, wrap_plain_attention
from sidecar.delta.batch import decode_rows
from sidecar.delta.cache_chunks import cache_chunk, fill_cache
from sidecar.delta.shared_prefix import SharedPrefix, shared_prefix_of, unshare

# Logits within 1e-5, plus 1e-6 of their largest magnitude: the two segments' weighted sums round apart (≈ 1e-7 per
# attention output), which the random tiny models' logits (up to ±45: 1 ulp = 4e-6) carry a few ulps.
LOGITS_ATOL, RTOL = 1e-5, 1e-6  # RTOL: for δ-states as well
STATE_ATOL = 1e-6
# With 8-bit K/V, those last-bit differences in a step's output can flip the rounding of a later
# token's quantized K/V: from the second decode step on, logits and states drift within these.
DRIFT_ATOL, DRIFT_STATE_ATOL = 1e-3, 1e-5
PREFIX = 150  # crosses two δ record intervals (64) and a KV buffer step (256 tokens: not crossed)

ADAPTERS = [  # Qwen3-4B ties its embeddings: so do these models (head_dim 64, for 8-bit K/V)
    ("tiny_tied_model_dir", "tiny_tied_adapter_dir"),  # TSW
    ("tiny_tied_model_dir", "tiny_tied_ssw_adapter_dir"),  # SSW: message-mean writes
    ("tiny_tied_model_dir", "tiny_tied_msw_adapter_dir"),  # MSW: several state heads
    ("tiny_tied_model_dir", "tiny_tied_one_layer_adapter_dir"),  # a plain layer beside a δ layer
    ("tiny_tied_model_dir", None),  # no adapter: every layer plain
]


def _model(request: pytest.FixtureRequest, model_dir: str, adapter_dir: str | None = None) -> Any:
    model, _ = load_model(Path(request.getfixturevalue(model_dir)))
    if adapter_dir is not None:
        attach_delta_mem(model, request.getfixturevalue(adapter_dir))
    return wrap_plain_attention(model)


def _tokens(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, 500, n).tolist()


def _prefill(model: Any, cache: list[Any], tokens: list[int], chunk: int = 37) -> mx.array:
    """Prefill in chunks (message ids for SSW: one message per chunk); the last position's logits."""
    logits = None
    for start in range(0, len(tokens), chunk):
        part = tokens[start : start + chunk]
        set_delta_controls_if_any(cache, message_ids=np.zeros((1, len(part)), dtype=np.int64))
        logits = model(mx.array([part]), cache=cache)[:, -1]
    mx.eval(logits)
    return logits


def set_delta_controls_if_any(cache: list[Any], **settings: Any) -> None:
    if any(hasattr(layer, "controls") for layer in cache):
        set_delta_controls(cache, **settings)


def _shared(model: Any, kv_bits: int | None, seed: int = 1) -> tuple[SharedPrefix, list[Any]]:
    """A frozen prefix and, beside it, a private copy of the same cache."""
    cache = make_cache(model, kv_bits)
    _prefill(model, cache, _tokens(seed, PREFIX))
    private = copy.deepcopy(cache)
    return SharedPrefix(cache), private


def _states(model: Any, cache: list[Any]) -> list[mx.array]:
    return delta_states(model, cache) if getattr(model, "delta_mem", None) is not None else []


def _assert_same(
    model: Any, shared: list[Any], private: list[Any], a: mx.array, b: mx.array, drifted: bool = False
) -> None:
    logits_atol, state_atol = (DRIFT_ATOL, DRIFT_STATE_ATOL) if drifted else (LOGITS_ATOL, STATE_ATOL)
    _assert_close(a, b, logits_atol)
    for s, p in zip(_states(model, shared), _states(model, private)):
        _assert_close(s, p, state_atol)


def _assert_close(actual: mx.array, expected: mx.array, atol: float, message: str = "") -> None:
    """Within `atol` plus RTOL of the largest magnitude (rounding scales with the vector, not the entry)."""
    expected_np = np.array(expected)
    bound = atol + RTOL * float(np.abs(expected_np).max())
    np.testing.assert_allclose(np.array(actual), expected_np, atol=bound, rtol=0, err_msg=message)


def _kv_bytes(cache: list[Any]) -> int:
    return sum(layer.nbytes for layer in cache)


@pytest.mark.parametrize("kv_bits", [None, 8])
@pytest.mark.parametrize(("model_dir", "adapter_dir"), ADAPTERS)
def test_a_session_on_a_shared_prefix_equals_its_private_copy(
    request: pytest.FixtureRequest, model_dir: str, adapter_dir: str, kv_bits: int | None
) -> None:
    model = _model(request, model_dir, adapter_dir)
    prefix, private = _shared(model, kv_bits)
    session = prefix.start_from()
    assert shared_prefix_of(session) is prefix and session[0].offset == PREFIX
    assert _kv_bytes(session) == delta_record_nbytes(session)  # δ records only: the K/V are referenced

    turn = _tokens(2, 90)
    a, b = _prefill(model, session, turn), _prefill(model, private, turn)
    _assert_same(model, session, private, a, b)
    for step in range(12):  # greedy decode, one row at a time: the model's own forward
        token = mx.argmax(b, axis=-1)
        assert mx.argmax(a, axis=-1).item() == token.item()
        a, b = model(token[:, None], cache=session)[:, -1], model(token[:, None], cache=private)[:, -1]
        _assert_same(model, session, private, a, b, drifted=kv_bits is not None and step > 0)
    assert shared_prefix_of(session) is prefix  # nothing copied the prefix in
    assert session[0].offset == private[0].offset == PREFIX + 90 + 12


@pytest.mark.parametrize(
    ("model_dir", "adapter_dir", "kv_bits"),
    [(*pair, bits) for pair in ADAPTERS[:3] for bits in (None, 8)] + [("tiny_model_dir", "tiny_adapter_dir", None)],
)
def test_mixed_rows_in_one_batch_equal_each_row_alone(
    request: pytest.FixtureRequest, model_dir: str, adapter_dir: str, kv_bits: int | None
) -> None:
    """Rows: two on prefix A (δ on, δ off), one on prefix B, a private copy of A, one with no prefix;
    a sixth row on prefix A joins after three steps. Each equals its private copy stepped alone."""
    model = _model(request, model_dir, adapter_dir)
    prefix_a, private_a = _shared(model, kv_bits, seed=1)
    prefix_b, private_b = _shared(model, kv_bits, seed=3)
    rows = [prefix_a.start_from(), prefix_a.start_from(), prefix_b.start_from(), copy.deepcopy(private_a)]
    rows.append(make_cache(model, kv_bits))
    alone = [copy.deepcopy(private_a), copy.deepcopy(private_a), copy.deepcopy(private_b)]
    alone += [copy.deepcopy(private_a), make_cache(model, kv_bits)]
    delta = [True, False, True, True, True]
    for i, (row, solo) in enumerate(zip(rows, alone)):
        turn = _tokens(10 + i, 20 + 7 * i)
        _prefill(model, row, turn), _prefill(model, solo, turn)
        set_delta_controls_if_any(row, enabled=delta[i])
        set_delta_controls_if_any(solo, enabled=delta[i])
    late, late_alone = prefix_a.start_from(), copy.deepcopy(private_a)
    _prefill(model, late, _tokens(30, 9)), _prefill(model, late_alone, _tokens(30, 9))

    tokens = [5, 7, 11, 13, 17, 19]
    for step in range(6):
        if step == 3:
            rows.append(late), alone.append(late_alone), delta.append(True)
        batch = mx.array(tokens[: len(rows)])
        together = decode_rows(model, batch, rows, delta)
        for i, (row, solo) in enumerate(zip(rows, alone)):
            single = model(batch[i : i + 1, None], cache=solo)[:, -1]
            _assert_close(together[i], single[0], LOGITS_ATOL, f"row {i}")
        tokens = [t + 1 for t in tokens]
    for i, (row, solo) in enumerate(zip(rows, alone)):
        for s, p in zip(_states(model, row), _states(model, solo)):
            _assert_close(s, p, STATE_ATOL, f"row {i}")
    assert [shared_prefix_of(r) for r in rows] == [prefix_a, prefix_a, prefix_b, None, None, prefix_a]


@pytest.mark.parametrize("kv_bits", [None, 8])
def test_a_rollback_into_the_prefix_makes_a_private_copy(
    request: pytest.FixtureRequest, kv_bits: int | None
) -> None:
    """A history that diverges inside the prefix: the trim copies the prefix in, then runs as a private
    cache would; the prefix itself is untouched (another session on it still equals its copy)."""
    model = _model(request, "tiny_tied_model_dir", "tiny_tied_adapter_dir")
    prefix, private = _shared(model, kv_bits)
    session, other, other_private = prefix.start_from(), prefix.start_from(), copy.deepcopy(private)
    _prefill(model, session, _tokens(4, 30)), _prefill(model, private, _tokens(4, 30))
    for cache in (session, private):
        for layer in cache:
            layer.trim(layer.offset - 128)  # a kept δ-state (128 = 2 × 64)
    assert shared_prefix_of(session) is None and session[0].offset == 128
    assert _kv_bytes(session) >= _kv_bytes(private) * 0.5  # it holds the prefix's first 128 tokens now
    turn = _tokens(5, 40)
    _assert_same(model, session, private, _prefill(model, session, turn), _prefill(model, private, turn))
    turn = _tokens(6, 25)
    _assert_same(model, other, other_private, _prefill(model, other, turn), _prefill(model, other_private, turn))


def test_a_copy_of_a_session_keeps_referencing_the_prefix(request: pytest.FixtureRequest) -> None:
    model = _model(request, "tiny_tied_model_dir", "tiny_tied_adapter_dir")
    prefix, _ = _shared(model, None)
    session = prefix.start_from()
    _prefill(model, session, _tokens(7, 20))
    copied = copy.deepcopy(session)
    assert shared_prefix_of(copied) is prefix
    assert all(a.prefix is b.prefix for a, b in zip(copied, session))
    unshare(copied)
    assert shared_prefix_of(copied) is None and shared_prefix_of(session) is prefix


@pytest.mark.parametrize("kv_bits", [None, 8])
def test_chunks_of_a_session_on_a_prefix_rebuild_it_both_ways(
    request: pytest.FixtureRequest, kv_bits: int | None
) -> None:
    """The disk cache's chunks: a session's own chunk after the prefix's, filled into a cache that
    references the prefix, or into an empty private one, continue exactly as the session does."""
    model = _model(request, "tiny_tied_model_dir", "tiny_tied_adapter_dir")
    prefix, _ = _shared(model, kv_bits)
    session = prefix.start_from()
    _prefill(model, session, _tokens(8, 50))
    chunks = [cache_chunk(prefix.snapshot, 0), cache_chunk(session, PREFIX)]
    referencing, private = prefix.start_from(), make_cache(model, kv_bits)
    fill_cache(referencing, chunks)
    fill_cache(private, chunks)
    assert shared_prefix_of(referencing) is prefix and shared_prefix_of(private) is None
    turn = _tokens(9, 15)
    expected = _prefill(model, session, turn)
    for cache in (referencing, private):
        _assert_same(model, cache, session, _prefill(model, cache, turn), expected)
