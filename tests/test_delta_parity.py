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
from sidecar.delta.config import DeltaMemConfig

PARITY = Path(__file__).parent / "parity"
TOL = dict(atol=1e-4, rtol=1e-4)


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
