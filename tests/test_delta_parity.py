"""The MLX runtime against the reference implementation's vectors (tests/parity, float32, 1e-4)."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import load_model

from sidecar.delta import attach_delta_mem, delta_states
from sidecar.delta.api import attach_tensors, set_delta_controls
from sidecar.delta.attention import DeltaAttention
from sidecar.delta.cache import DeltaControls, DeltaKVCache
from sidecar.delta.config import DeltaMemConfig
from sidecar.delta.scan import scan

PARITY = Path(__file__).parent / "parity"
TOL = dict(atol=1e-4, rtol=1e-4)
# The scan variants hold no model, only the recurrence: the README gives ≤ 1e-6 for them.
SCAN_TOL = dict(atol=1e-6, rtol=0)
VARIANTS = sorted(json.loads((PARITY / "scan_variants" / "variants_info.json").read_text()))


def _expected(case: str) -> dict[str, np.ndarray]:
    return dict(np.load(PARITY / case / "expected.npz"))


def _model(case: str, attach: bool = True):
    model, _ = load_model(PARITY / case / "model")
    if attach:
        config = DeltaMemConfig.from_dict(
            json.loads((PARITY / case / "adapter" / "delta_mem_config.json").read_text())
        )
        tensors = dict(np.load(PARITY / case / "adapter_tensors.npz"))
        attach_tensors(model, config, tensors)
    return model


def _close(actual: mx.array, expected: np.ndarray) -> None:
    np.testing.assert_allclose(np.array(actual), expected, **TOL)


def _states_equal(model, cache, expected: dict[str, np.ndarray], key: str) -> None:
    for i, state in enumerate(delta_states(model, cache)):
        _close(state, expected[f"{key}_layer{i}"])


def _decode(model, cache, tokens: np.ndarray) -> list[mx.array]:
    return [model(mx.array([[int(t)]]), cache=cache)[0, -1] for t in tokens]


@pytest.mark.parametrize("case", ["tsw_model", "msw_model"])
def test_prefill_decode_and_chunking_match_reference(case: str) -> None:
    exp = _expected(case)
    model = _model(case)
    ids = mx.array(exp["input_ids"])

    cache = make_prompt_cache(model)
    _close(model(ids, cache=cache), exp["prefill_logits"])
    _states_equal(model, cache, exp, "state_after_prefill")

    logits = _decode(model, cache, exp["decode_tokens"])
    _close(mx.stack(logits), exp["decode_logits"])
    _states_equal(model, cache, exp, "state_after_decode")

    full = np.concatenate([exp["input_ids"], exp["decode_tokens"][None]], axis=1)
    _close(model(mx.array(full), cache=make_prompt_cache(model)), exp["oneshot_full_logits"])

    cache = make_prompt_cache(model)
    half = ids.shape[1] // 2
    _close(model(ids[:, :half], cache=cache), exp["chunked_logits_first_half"])
    _close(model(ids[:, half:], cache=cache), exp["chunked_logits_second_half"])
    _states_equal(model, cache, exp, "state_after_chunked")


@pytest.mark.parametrize("case", ["tsw_model", "msw_model"])
def test_state_after_every_decode_step_matches(case: str) -> None:
    exp = _expected(case)
    model = _model(case)
    cache = make_prompt_cache(model)
    model(mx.array(exp["input_ids"]), cache=cache)
    for step, token in enumerate(exp["decode_tokens"]):
        model(mx.array([[int(token)]]), cache=cache)
        for layer, state in enumerate(delta_states(model, cache)):
            _close(state, exp[f"state_per_decode_step_layer{layer}"][step])


@pytest.mark.parametrize("case", ["tsw_model", "msw_model", "ssw_model"])
def test_delta_off_is_exactly_the_base_model(case: str) -> None:
    exp = _expected(case)
    ids = mx.array(exp["input_ids"])
    plain = _model(case, attach=False)(ids, cache=make_prompt_cache(_model(case, attach=False)))
    _close(plain, exp["base_prefill_logits"])

    model = _model(case)
    cache = make_prompt_cache(model)
    set_delta_controls(cache, enabled=False)
    assert np.array_equal(np.array(model(ids, cache=cache)), np.array(plain))
    assert all(float(mx.abs(s).max()) == 0.0 for s in delta_states(model, cache))


def test_write_disabled_decode_reads_a_frozen_state() -> None:
    exp = _expected("tsw_model_write_disabled")
    model = _model("tsw_model")
    cache = make_prompt_cache(model)
    _close(model(mx.array(exp["input_ids"]), cache=cache), exp["prefill_logits"])
    frozen = [np.array(s) for s in delta_states(model, cache)]

    set_delta_controls(cache, write=False)
    _close(mx.stack(_decode(model, cache, exp["decode_tokens"])), exp["decode_logits"])
    for before, after in zip(frozen, delta_states(model, cache)):
        assert np.array_equal(before, np.array(after))  # bit for bit

    cache = make_prompt_cache(model)
    set_delta_controls(cache, write=False)
    out = model(mx.array(exp["input_ids"]), cache=cache)
    _close(out, exp["prefill_logits_write_disabled_from_zero"])
    _close(out, exp["base_prefill_logits"])


def test_message_mean_writes_match_reference() -> None:
    exp = _expected("ssw_model")
    model = _model("ssw_model")
    ids = mx.array(exp["input_ids"])
    message_ids = exp["message_ids"]

    cache = make_prompt_cache(model)
    set_delta_controls(cache, message_ids=message_ids)
    _close(model(ids, cache=cache), exp["prefill_logits"])
    _states_equal(model, cache, exp, "state_after_prefill")
    set_delta_controls(cache, message_ids=np.array([[3]]))
    _close(mx.stack(_decode(model, cache, exp["decode_tokens"])), exp["decode_logits"])
    _states_equal(model, cache, exp, "state_after_decode")

    cache = make_prompt_cache(model)
    half = ids.shape[1] // 2
    set_delta_controls(cache, message_ids=message_ids[:, :half])
    _close(model(ids[:, :half], cache=cache), exp["chunked_logits_first_half"])
    set_delta_controls(cache, message_ids=message_ids[:, half:])
    _close(model(ids[:, half:], cache=cache), exp["chunked_logits_second_half"])
    _states_equal(model, cache, exp, "state_after_chunked")


@pytest.mark.parametrize(
    "ids_of",
    [lambda m: None, lambda m: np.full_like(m, -1), lambda m: m[:, :5]],
    ids=["no-ids", "all-minus-one", "wrong-shape"],
)
def test_message_mean_falls_back_to_token_writes(ids_of) -> None:
    exp = _expected("ssw_model")
    model = _model("ssw_model")
    cache = make_prompt_cache(model)
    set_delta_controls(cache, message_ids=ids_of(exp["message_ids"]))
    _close(model(mx.array(exp["input_ids"]), cache=cache), exp["prefill_logits_no_message_ids"])
    _close(model(mx.array(exp["input_ids"]), cache=make_prompt_cache(model)), exp["prefill_logits_no_message_ids"])
    _states_equal(model, cache, exp, "state_after_prefill_no_message_ids")
    np.testing.assert_allclose(exp["prefill_logits_all_minus1_ids"], exp["prefill_logits_no_message_ids"])


def test_message_mean_decode_without_ids() -> None:
    exp = _expected("ssw_model")
    model = _model("ssw_model")
    cache = make_prompt_cache(model)
    set_delta_controls(cache, message_ids=exp["message_ids"])
    model(mx.array(exp["input_ids"]), cache=cache)
    set_delta_controls(cache)
    _close(mx.stack(_decode(model, cache, exp["decode_tokens"])), exp["decode_logits_no_message_ids"])
    _states_equal(model, cache, exp, "state_after_decode_no_message_ids")


@pytest.mark.parametrize("case", ["tsw_model", "msw_model", "ssw_model"])
def test_attach_from_the_reference_adapter_file(case: str) -> None:
    """The public entry point reads the reference's torch file (no torch) and gives the same model."""
    exp = _expected(case)
    model, _ = load_model(PARITY / case / "model")
    attach_delta_mem(model, PARITY / case / "adapter")
    cache = make_prompt_cache(model)
    if case == "ssw_model":
        set_delta_controls(cache, message_ids=exp["message_ids"])
    _close(model(mx.array(exp["input_ids"]), cache=cache), exp["prefill_logits"])
    _states_equal(model, cache, exp, "state_after_prefill")


# ---- (e) scan variants: every update mode, gate shape and head count, without a model


def test_all_nine_scan_variants_are_tested() -> None:
    assert len(VARIANTS) == 9
    assert {p.name.removesuffix(".npz") for p in (PARITY / "scan_variants").glob("*.npz")} == set(VARIANTS)


def _variant(name: str) -> tuple[DeltaMemConfig, dict[str, np.ndarray]]:
    config = json.loads((PARITY / "scan_variants" / f"{name}.config.json").read_text())
    return DeltaMemConfig.from_dict(config), dict(np.load(PARITY / "scan_variants" / f"{name}.npz"))


def _heads_first(x: np.ndarray, heads: int) -> mx.array:
    """A reference array [1, T, heads·w] or [1, T, heads, w] in the scan's layout [1, heads, T, w]."""
    return mx.array(x.reshape(1, x.shape[1], heads, -1).swapaxes(1, 2))


@pytest.mark.parametrize("name", VARIANTS)
def test_scan_variant_reads_and_states_match_reference(name: str) -> None:
    config, exp = _variant(name)
    H = config.num_state_heads
    q, k, v, keep, erase, write = (_heads_first(exp[key], H) for key in ("q", "k", "v", "keep", "erase", "write"))
    state_shape = (1, H, config.rank, config.rank)
    for start, suffix in ((np.zeros(state_shape, np.float32), ""), (exp["state0"], "_from_state0")):
        reads, final = scan(q, k, v, keep, erase, write, mx.array(start.reshape(state_shape)))
        actual_reads = reads.swapaxes(1, 2).reshape(exp[f"reads{suffix}"].shape)
        np.testing.assert_allclose(np.array(actual_reads), exp[f"reads{suffix}"], **SCAN_TOL)
        actual_final = final.reshape(exp[f"final_state{suffix}"].shape)
        np.testing.assert_allclose(np.array(actual_final), exp[f"final_state{suffix}"], **SCAN_TOL)


def _wrapped_attention(config: DeltaMemConfig, exp: dict[str, np.ndarray]) -> DeltaAttention:
    """The reference's standalone Qwen3 attention (hidden 64) with the variant's memory weights."""
    model = _model("tsw_model", attach=False)
    base = model.layers[0].self_attn
    names = ["memory_q_proj", "memory_k_proj", "memory_v_proj", "beta_proj", "beta_bias", "lambda_proj", "lambda_bias"]
    tensors = {name: exp[name] for name in names if name in exp}
    # The Δ maps only turn reads into outputs; the reference vectors hold states, not outputs.
    rng = np.random.default_rng(0)
    tensors["delta_q_proj"] = rng.normal(0, 0.2, (base.n_heads * 16, config.memory_dim)).astype(np.float32)
    tensors["delta_o_proj"] = rng.normal(0, 0.2, (64, config.memory_dim)).astype(np.float32)
    return DeltaAttention(base, config, tensors)


@pytest.mark.parametrize("decode", [False, True], ids=["prefill", "token-by-token"])
@pytest.mark.parametrize("name", VARIANTS)
def test_scan_variant_through_the_wrapped_attention(name: str, decode: bool) -> None:
    """The variant's settings reach the gates: the layer, fed the reference input, leaves its states."""
    config, exp = _variant(name)
    attention = _wrapped_attention(config, exp)
    x = mx.array(exp["x"])
    for start, key in ((None, "final_state"), (exp["state0"], "final_state_from_state0")):
        cache = DeltaKVCache(attention.state_shape, DeltaControls())
        if start is not None:
            cache.set_current_state(mx.array(start))
        if decode:
            for t in range(x.shape[1]):
                attention(x[:, t : t + 1], cache=cache)
        else:
            attention(x, mask="causal", cache=cache)
        np.testing.assert_allclose(np.array(cache.current_state()), exp[key], **SCAN_TOL)
