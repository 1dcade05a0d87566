"""δ runtime behaviour beyond the reference vectors: exact trimming, chunking, context writes, controls."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache
from mlx_lm.utils import load_model

from common.kv_budget import DELTA_RECORD_INTERVAL
from sidecar.delta import attach_delta_mem, delta_states
from sidecar.delta.adapter_files import AdapterError
from sidecar.delta.api import (
    delta_controls,
    delta_state_stats,
    restorable_offset,
    set_delta_controls,
    set_delta_states,
    write_context,
)
from sidecar.delta.cache import MissingDeltaState
from sidecar.delta.config import CONFIG_FILE
from sidecar.delta.scan import scan
from sidecar.testing.tiny_model import write_tiny_adapter, write_tiny_model

ATOL = 1e-5


def _delta_model(model_dir: Path, adapter_dir: Path):
    model, _ = load_model(model_dir)
    return attach_delta_mem(model, adapter_dir)


def _tokens(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, 700, size=n).tolist()


def _run(model, cache, tokens: list[int]) -> mx.array:
    return model(mx.array([tokens]), cache=cache)


def _assert_states_close(a: list[mx.array], b: list[mx.array], atol: float = ATOL) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_allclose(np.array(x), np.array(y), atol=atol, rtol=0)


@pytest.fixture(params=["tsw", "msw"])
def model(request, tiny_model_dir, tiny_adapter_dir, tiny_msw_adapter_dir):
    adapter = tiny_adapter_dir if request.param == "tsw" else tiny_msw_adapter_dir
    return _delta_model(tiny_model_dir, adapter)


def test_any_chunking_equals_one_shot(model) -> None:
    tokens = _tokens(70)
    full_cache = make_prompt_cache(model)
    full = _run(model, full_cache, tokens)
    cache = make_prompt_cache(model)
    pieces, start = [], 0
    for size in (1, 7, 31, 2, 29):
        pieces.append(_run(model, cache, tokens[start : start + size]))
        start += size
    np.testing.assert_allclose(np.array(mx.concatenate(pieces, axis=1)), np.array(full), atol=ATOL)
    _assert_states_close(delta_states(model, cache), delta_states(model, full_cache))


def _cut_back(model, cache, tokens: list[int], to: int) -> int:
    """Trim to `to` exactly: back to the kept state at or before it, then prefill the rest again."""
    start = restorable_offset(cache, to)
    trim_prompt_cache(cache, cache[0].offset - start)
    if to > start:
        _run(model, cache, tokens[start:to])
    return start


@pytest.mark.parametrize("back_to", [0, DELTA_RECORD_INTERVAL, 2 * DELTA_RECORD_INTERVAL, 100])
def test_trim_to_a_kept_offset_is_exact_at_once(model, back_to: int) -> None:
    # Kept: every DELTA_RECORD_INTERVAL-th token and the marked offset 100 (a message start).
    tokens, other = _tokens(160), _tokens(160, seed=1)
    reference = make_prompt_cache(model)
    expected = _run(model, reference, tokens[:back_to] + other[back_to:])

    cache = make_prompt_cache(model)
    set_delta_controls(cache, keep=[100])
    _run(model, cache, tokens[:150])
    assert restorable_offset(cache, back_to) == back_to
    assert trim_prompt_cache(cache, 150 - back_to) == 150 - back_to
    continued = _run(model, cache, other[back_to:])
    np.testing.assert_allclose(np.array(continued), np.array(expected[:, back_to:]), atol=ATOL)
    _assert_states_close(delta_states(model, cache), delta_states(model, reference))


@pytest.mark.parametrize("back_to", [1, 17, 63, 65, 127, 149])
def test_trim_elsewhere_is_exact_once_refilled_from_the_restorable_offset(model, back_to: int) -> None:
    tokens, other = _tokens(160), _tokens(160, seed=1)
    reference = make_prompt_cache(model)
    expected = _run(model, reference, tokens[:back_to] + other[back_to:])

    cache = make_prompt_cache(model)
    _run(model, cache, tokens[:150])
    trim_prompt_cache(cache, 150 - back_to)
    with pytest.raises(MissingDeltaState):
        _run(model, cache, other[back_to:])  # never a silently wrong state
    start = _cut_back(model, cache, tokens, back_to)
    assert start == back_to // DELTA_RECORD_INTERVAL * DELTA_RECORD_INTERVAL
    continued = _run(model, cache, other[back_to:])
    np.testing.assert_allclose(np.array(continued), np.array(expected[:, back_to:]), atol=ATOL)
    _assert_states_close(delta_states(model, cache), delta_states(model, reference))


@pytest.mark.parametrize("back_to", [0, 70, 128, 139])
def test_token_by_token_states_are_exact_at_any_offset(model, back_to: int) -> None:
    tokens, other = _tokens(150), _tokens(150, seed=1)
    reference = make_prompt_cache(model)
    expected = _run(model, reference, tokens[:back_to] + other[back_to:])

    cache = make_prompt_cache(model)
    for token in tokens[:140]:
        _run(model, cache, [token])
    trim_prompt_cache(cache, 140 - back_to)
    _cut_back(model, cache, tokens, back_to)
    continued = _run(model, cache, other[back_to:])
    np.testing.assert_allclose(np.array(continued), np.array(expected[:, back_to:]), atol=ATOL)
    _assert_states_close(delta_states(model, cache), delta_states(model, reference))


def test_the_record_keeps_one_state_per_interval_and_per_mark(model) -> None:
    cache = make_prompt_cache(model)
    set_delta_controls(cache, keep=[5, 130])
    _run(model, cache, _tokens(100))
    for token in _tokens(100, seed=2):  # decoding keeps states on the same schedule
        _run(model, cache, [token])
    record = cache[0].record
    assert list(zip(record.starts, record.ends)) == [(o, o) for o in (5, 64, 128, 130, 192)]
    assert cache[0].delta_nbytes == record.kept.nbytes + record.latest.nbytes
    assert record.kept.shape[1] == 64  # one buffer step for up to 64 kept states


def test_decoding_continues_the_sequence(model) -> None:
    prompt = _tokens(25)
    cache = make_prompt_cache(model)
    generated = [token for token, _ in generate_step(mx.array(prompt), model, prompt_cache=cache, max_tokens=6)]
    # mlx-lm's generate_step feeds every token it yields back into the cache.
    assert cache[0].offset == len(prompt) + len(generated)
    reference = make_prompt_cache(model)
    _run(model, reference, prompt + generated)
    _assert_states_close(delta_states(model, cache), delta_states(model, reference))


def test_write_context_changes_memory_but_not_the_kv_cache(model) -> None:
    prefix, snippet, suffix = _tokens(20), _tokens(12, seed=2), _tokens(8, seed=3)
    cache = make_prompt_cache(model)
    _run(model, cache, prefix)
    before = [np.array(s) for s in delta_states(model, cache)]
    write_context(model, cache, snippet)
    assert all(c.offset == len(prefix) for c in cache)

    reference = make_prompt_cache(model)
    _run(model, reference, prefix + snippet)  # the snippet at the same positions, written the same way
    _assert_states_close(delta_states(model, cache), delta_states(model, reference))
    assert any(not np.allclose(b, np.array(a)) for b, a in zip(before, delta_states(model, cache)))

    out = _run(model, cache, suffix)
    plain_kv = make_prompt_cache(model)
    _run(model, plain_kv, prefix)
    set_delta_states(model, plain_kv, delta_states(model, reference))
    np.testing.assert_allclose(np.array(out), np.array(_run(model, plain_kv, suffix)), atol=ATOL)


def test_delta_off_calls_leave_the_state_untouched(model) -> None:
    a, b, c = _tokens(15), _tokens(10, seed=4), _tokens(5, seed=5)
    cache = make_prompt_cache(model)
    _run(model, cache, a)
    after_a = [np.array(s) for s in delta_states(model, cache)]
    with delta_controls(cache, enabled=False):
        _run(model, cache, b)
    for expected, state in zip(after_a, delta_states(model, cache)):
        np.testing.assert_array_equal(expected, np.array(state))
    _run(model, cache, c)
    trim_prompt_cache(cache, len(c) + 3)  # back into the δ-off stretch: kept as one run
    assert restorable_offset(cache, cache[0].offset) == cache[0].offset
    for expected, state in zip(after_a, delta_states(model, cache)):
        np.testing.assert_array_equal(expected, np.array(state))


def test_first_token_equals_the_base_model_and_writes_can_be_frozen(model, tiny_model_dir) -> None:
    tokens = _tokens(12)
    base, _ = load_model(tiny_model_dir)
    plain = base(mx.array([tokens]))
    out = _run(model, make_prompt_cache(model), tokens)
    np.testing.assert_array_equal(np.array(out[:, 0]), np.array(plain[:, 0]))
    assert not np.allclose(np.array(out[:, 1:]), np.array(plain[:, 1:]), atol=1e-3)

    cache = make_prompt_cache(model)
    set_delta_controls(cache, write=False)
    np.testing.assert_array_equal(np.array(_run(model, cache, tokens)), np.array(plain))


def test_state_stats_describe_each_layer(model) -> None:
    cache = make_prompt_cache(model)
    _run(model, cache, _tokens(9))
    stats = delta_state_stats(model, cache)
    assert [s["layer"] for s in stats] == [0, 1]
    assert all(s["norm"] > 0 and 0 < s["max_abs"] <= s["norm"] and s["nonzero"] > 0 for s in stats)


def test_message_mean_state_at_a_message_boundary_equals_a_split_call(tiny_model_dir, tiny_ssw_adapter_dir):
    model = _delta_model(tiny_model_dir, tiny_ssw_adapter_dir)
    tokens = _tokens(24)
    ids = np.array([[-1] * 4 + [0] * 10 + [1] * 10])
    cache = make_prompt_cache(model)
    set_delta_controls(cache, message_ids=ids, keep=[4, 14])  # the message starts, as the engine marks them
    _run(model, cache, tokens)
    trim_prompt_cache(cache, 10)  # back to the end of message 0

    split = make_prompt_cache(model)
    set_delta_controls(split, message_ids=ids[:, :14])
    _run(model, split, tokens[:14])
    _assert_states_close(delta_states(model, cache), delta_states(model, split))


def test_qwen2_models_are_supported(tiny_qwen2_model_dir, tiny_qwen2_adapter_dir) -> None:
    model = _delta_model(tiny_qwen2_model_dir, tiny_qwen2_adapter_dir)
    base, _ = load_model(tiny_qwen2_model_dir)
    tokens = _tokens(10)
    cache = make_prompt_cache(model)
    set_delta_controls(cache, enabled=False)
    np.testing.assert_array_equal(np.array(_run(model, cache, tokens)), np.array(base(mx.array([tokens]))))
    set_delta_controls(cache)
    _run(model, cache, tokens)
    assert delta_state_stats(model, cache)[0]["norm"] > 0


def test_bf16_model_keeps_a_float32_state(tmp_path) -> None:
    model_dir = write_tiny_model(tmp_path / "bf16", dtype="bfloat16")
    model = _delta_model(model_dir, write_tiny_adapter(tmp_path / "adapter", model_dir))
    cache = make_prompt_cache(model)
    out = _run(model, cache, _tokens(10))
    assert out.dtype == mx.bfloat16
    assert all(s.dtype == mx.float32 for s in delta_states(model, cache))


def test_adapter_for_another_model_is_refused(tmp_path, tiny_model_dir) -> None:
    other = write_tiny_model(tmp_path / "wide", hidden_size=96)
    adapter = write_tiny_adapter(tmp_path / "adapter", other)
    model, _ = load_model(tiny_model_dir)
    with pytest.raises(AdapterError, match=r"memory_q_proj has shape \[8, 96\], expected \[8, 64\]"):
        attach_delta_mem(model, adapter)
    assert getattr(model, "delta_mem", None) is None


# The settings of the reference's nine scan variants: (variant, state_update_mode, couple_lambda, rankwise_gates).
UPDATE_SETTINGS = [
    ("tsw", "standard", True, True),
    ("tsw", "lambda_outside", True, True),
    ("tsw", "no_lambda", True, True),
    ("tsw", "standard", False, True),
    ("tsw", "lambda_outside", False, True),
    ("tsw", "standard", True, False),
    ("tsw", "standard", False, False),
    ("msw", "standard", True, True),
    ("msw", "standard", True, False),
]


@pytest.mark.parametrize(("variant", "mode", "coupled", "rankwise"), UPDATE_SETTINGS)
def test_every_update_setting_runs_through_the_model(
    tiny_model_dir, tmp_path, variant: str, mode: str, coupled: bool, rankwise: bool
) -> None:
    """Prefill (the chunked scan), chunked prefill and decoding (the compiled step) agree in every setting."""
    settings = dict(variant=variant, state_update_mode=mode, couple_lambda=coupled, rankwise_gates=rankwise)
    model = _delta_model(tiny_model_dir, write_tiny_adapter(tmp_path / "adapter", tiny_model_dir, **settings))
    tokens = _tokens(40)
    one_shot = make_prompt_cache(model)
    logits = _run(model, one_shot, tokens)
    chunked = make_prompt_cache(model)
    pieces = [_run(model, chunked, tokens[a:b]) for a, b in ((0, 5), (5, 21), (21, 40))]
    np.testing.assert_allclose(np.array(mx.concatenate(pieces, axis=1)), np.array(logits), atol=ATOL)
    stepped = make_prompt_cache(model)
    steps = [_run(model, stepped, [token]) for token in tokens]
    np.testing.assert_allclose(np.array(mx.concatenate(steps, axis=1)), np.array(logits), atol=ATOL)
    for cache in (chunked, stepped):
        _assert_states_close(delta_states(model, cache), delta_states(model, one_shot))
    # The setting reaches the computation: the same tensors with the released update rule give other states.
    if (mode, coupled) != ("standard", True):
        released = tmp_path / "released"
        shutil.copytree(tmp_path / "adapter", released)
        config = {**json.loads((released / CONFIG_FILE).read_text()), "state_update_mode": "standard"}
        (released / CONFIG_FILE).write_text(json.dumps({**config, "couple_lambda": True}))
        other = _delta_model(tiny_model_dir, released)
        other_cache = make_prompt_cache(other)
        _run(other, other_cache, tokens)
        ours, released_states = delta_states(model, one_shot)[0], delta_states(other, other_cache)[0]
        assert not np.allclose(np.array(ours), np.array(released_states))


def _sequential(q, k, v, keep, erase, write) -> tuple[np.ndarray, np.ndarray]:
    """The recurrence token by token in float64, from a zero state: reads [B, H, T, r] and the final state."""
    B, H, T, r = q.shape
    keep, erase, write = (np.broadcast_to(g, (B, H, T, r)).astype(np.float64) for g in (keep, erase, write))
    state = np.zeros((B, H, r, r))
    reads = np.zeros((B, H, T, r))
    for t in range(T):
        reads[:, :, t] = np.einsum("bhij,bhj->bhi", state, q[:, :, t])
        erased = np.einsum("bhij,bhj->bhi", state, k[:, :, t])[..., None] * k[:, :, t, None, :]
        written = v[:, :, t, :, None] * k[:, :, t, None, :]
        state = keep[:, :, t, :, None] * state - erase[:, :, t, :, None] * erased + write[:, :, t, :, None] * written
    return reads, state


@pytest.mark.parametrize("rows", [8, 1], ids=["rankwise-gates", "scalar-gates"])
@pytest.mark.parametrize("mode", ["standard", "lambda_outside", "no_lambda"])
def test_saturated_gates_over_1000_tokens_match_the_sequential_recurrence(mode: str, rows: int) -> None:
    # Gates from open to saturated: where β ≈ 1, keep = 1 − β underflows to 0, and products of keeps
    # span hundreds of orders of magnitude next to keeps of ≈ 1 (differences of their logs lose them).
    rng = np.random.default_rng(7)
    B, H, T, r = 1, 2, 1000, 8

    def unit(x: np.ndarray) -> np.ndarray:
        return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)

    q, k = unit(np.tanh(rng.normal(size=(B, H, T, r)))), unit(np.tanh(rng.normal(size=(B, H, T, r))))
    v = rng.normal(size=(B, H, T, r)).astype(np.float32)
    beta = (1 / (1 + np.exp(-rng.uniform(-10, 40, size=(B, H, T, rows))))).astype(np.float32)
    lam = (1 - beta).astype(np.float32)
    keep, erase, write = {
        "standard": (lam, beta, beta),
        "lambda_outside": (lam, lam * beta, beta),
        "no_lambda": (np.ones_like(beta), beta, beta),
    }[mode]
    assert mode == "no_lambda" or float(keep.min()) == 0.0
    reads, final = scan(*(mx.array(a) for a in (q, k, v, keep, erase, write)), mx.zeros((B, H, r, r)))
    expected_reads, expected_final = _sequential(q, k, v, keep, erase, write)
    # 1e-6 of the largest value: no_lambda never decays, so its state grows to ~3.
    for actual, expected in ((reads, expected_reads), (final, expected_final)):
        scale = max(1.0, float(np.abs(expected).max()))
        np.testing.assert_allclose(np.array(actual), expected, atol=1e-6 * scale, rtol=0)
