"""The δ attention layer against a sequential numpy reference of DESIGN.md §2, token by token.

Every path that computes q_m and k_m is covered: the chunked prefill scan, the compiled decode step
and SSW's message-mean writes (whose reads come from the read-only path), each with
`normalize_qk` true (the released recipe) and false (raw tanh outputs).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.utils import load_model

from sidecar.delta import attention
from sidecar.delta.adapter_files import model_dims
from sidecar.delta.api import attach_tensors
from sidecar.delta.cache import DeltaControls, DeltaKVCache
from sidecar.delta.config import AdapterConfigError, DeltaMemConfig, tensor_key
from sidecar.testing.tiny_model import random_adapter_tensors

TOL = dict(atol=2e-5, rtol=1e-4)
CONFIGS = {
    "tsw": DeltaMemConfig(),
    "msw-scalar-gates-own-lambda": DeltaMemConfig(
        num_state_heads=4, rankwise_gates=False, couple_lambda=False, state_update_mode="lambda_outside"
    ),
}


class Layer:
    """Layer 0 of the tiny model with δ attached, its tensors, and the Δ terms of every call."""

    def __init__(self, model_dir: Path, config: DeltaMemConfig, monkeypatch: pytest.MonkeyPatch):
        model, _ = load_model(model_dir)
        dims = model_dims(json.loads((model_dir / "config.json").read_text()))
        tensors = random_adapter_tensors(config, dims, seed=7)
        attach_tensors(model, config, tensors)
        self.config = config
        self.module = model.layers[0].self_attn
        prefix = tensor_key(0, "")
        self.tensors = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
        self.hidden = dims.hidden_size
        self.deltas: list[dict[str, np.ndarray]] = []
        attend = attention._attend

        def recording(base: Any, x: mx.array, mask: Any, cache: Any, deltas: dict[str, mx.array]) -> mx.array:
            self.deltas.append({head: np.array(delta[0]) for head, delta in deltas.items()})
            return attend(base, x, mask, cache, deltas)

        monkeypatch.setattr(attention, "_attend", recording)

    def cache(self, message_ids: np.ndarray | None = None) -> DeltaKVCache:
        """A fresh per-layer cache (zero state) that keeps the state after every token, to compare each."""
        every_offset = frozenset(range(1, 1024))
        return DeltaKVCache(self.module.state_shape, DeltaControls(message_ids=message_ids, keep=every_offset))

    def __call__(self, x: np.ndarray, cache: DeltaKVCache) -> None:
        self.module(mx.array(x[None]), mask="causal" if len(x) > 1 else None, cache=cache)


# --------------------------------------------------------------------------- the reference


def _inputs(config: DeltaMemConfig, t: dict[str, np.ndarray], x: np.ndarray) -> tuple[np.ndarray, ...]:
    """q, k, v [H, r] and keep, erase, write [H, g, 1] for one input vector x."""
    H, r = config.num_state_heads, config.rank
    g = r if config.rankwise_gates else 1
    x = x.astype(np.float64)
    q, k = (np.tanh(t[name] @ x).reshape(H, r) for name in ("memory_q_proj", "memory_k_proj"))
    if config.normalize_qk:
        q, k = (a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-6) for a in (q, k))
    v = (t["memory_v_proj"] @ x).reshape(H, r)
    beta = 1 / (1 + np.exp(-(t["beta_proj"] @ x + t["beta_bias"])))
    lam = 1 - beta if config.couple_lambda else 1 / (1 + np.exp(-(t["lambda_proj"] @ x + t["lambda_bias"])))
    keep, erase, write = {
        "standard": (lam, beta, beta),
        "lambda_outside": (lam, lam * beta, beta),
        "no_lambda": (np.ones_like(beta), beta, beta),
    }[config.state_update_mode]
    return q, k, v, *(a.reshape(H, g, 1) for a in (keep, erase, write))


def _write(config: DeltaMemConfig, t: dict[str, np.ndarray], x: np.ndarray, S: np.ndarray) -> np.ndarray:
    """S_t = keep ⊙ S − erase ⊙ (S k) kᵀ + write ⊙ v kᵀ, per state head (gates scale rows)."""
    _, k, v, keep, erase, write = _inputs(config, t, x)
    Sk = np.einsum("hij,hj->hi", S, k)
    return keep * S - erase * Sk[..., None] * k[:, None, :] + write * v[..., None] * k[:, None, :]


def _read(config: DeltaMemConfig, t: dict[str, np.ndarray], x: np.ndarray, S: np.ndarray) -> np.ndarray:
    """read = S q (the state before the token), as [H·r]."""
    q = _inputs(config, t, x)[0]
    return np.einsum("hij,hj->hi", S, q).reshape(-1)


def _deltas(config: DeltaMemConfig, t: dict[str, np.ndarray], read: np.ndarray) -> dict[str, np.ndarray]:
    return {head: config.scale * t[f"delta_{head}_proj"] @ read for head in config.delta_heads}


def _token_writes(layer: Layer, xs: np.ndarray, S: np.ndarray) -> tuple[list[dict[str, np.ndarray]], list[np.ndarray]]:
    """Δ terms and the state after each token, one token at a time."""
    deltas, states = [], []
    for x in xs:
        deltas.append(_deltas(layer.config, layer.tensors, _read(layer.config, layer.tensors, x, S)))
        S = _write(layer.config, layer.tensors, x, S)
        states.append(S)
    return deltas, states


# --------------------------------------------------------------------------- the runtime against it


def _state(cache: DeltaKVCache, offset: int, config: DeltaMemConfig) -> np.ndarray:
    H, r = config.num_state_heads, config.rank
    return np.array(cache.state_at(offset, 1)[0]).reshape(H, r, r)


def _assert_deltas(actual: list[dict[str, np.ndarray]], expected: list[dict[str, np.ndarray]]) -> None:
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected):
        assert got.keys() == want.keys()
        for head in want:
            np.testing.assert_allclose(got[head], want[head], **TOL)


@pytest.fixture(params=[True, False], ids=["normalized", "raw"])
def normalize_qk(request: pytest.FixtureRequest) -> bool:
    return request.param


@pytest.mark.parametrize("name", CONFIGS)
def test_prefill_scan_matches_the_sequential_recurrence(
    name: str, normalize_qk: bool, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layer = Layer(tiny_model_dir, replace(CONFIGS[name], normalize_qk=normalize_qk), monkeypatch)
    xs = np.random.default_rng(0).normal(size=(37, layer.hidden)).astype(np.float32)  # 3 chunks, padded
    cache = layer.cache()
    layer(xs, cache)
    deltas, states = _token_writes(layer, xs, np.zeros((layer.config.num_state_heads, 8, 8)))
    (got,) = layer.deltas
    _assert_deltas([{h: d[t] for h, d in got.items()} for t in range(len(xs))], deltas)
    for t, expected in enumerate(states, start=1):
        np.testing.assert_allclose(_state(cache, t, layer.config), expected, **TOL)


@pytest.mark.parametrize("name", CONFIGS)
def test_decode_steps_match_the_sequential_recurrence(
    name: str, normalize_qk: bool, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layer = Layer(tiny_model_dir, replace(CONFIGS[name], normalize_qk=normalize_qk), monkeypatch)
    xs = np.random.default_rng(1).normal(size=(12, layer.hidden)).astype(np.float32)
    cache = layer.cache()
    for x in xs:
        layer(x[None], cache)
    deltas, states = _token_writes(layer, xs, np.zeros((layer.config.num_state_heads, 8, 8)))
    _assert_deltas([{h: d[0] for h, d in step.items()} for step in layer.deltas], deltas)
    for t, expected in enumerate(states, start=1):
        np.testing.assert_allclose(_state(cache, t, layer.config), expected, **TOL)


def test_message_mean_writes_match_the_sequential_recurrence(
    normalize_qk: bool, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = DeltaMemConfig(memory_write_granularity="message_mean", normalize_qk=normalize_qk)
    layer = Layer(tiny_model_dir, config, monkeypatch)
    rng = np.random.default_rng(2)
    first, xs = rng.normal(size=(5, layer.hidden)), rng.normal(size=(9, layer.hidden))
    ids = np.array([[0, 0, 0, -1, 1, 1, 2, 2, 2]])  # -1: read, not written
    cache = layer.cache()
    layer(first.astype(np.float32), cache)  # no ids: token writes, so the SSW call starts from a non-zero state
    cache.controls.message_ids = ids
    layer(xs.astype(np.float32), cache)

    _, before = _token_writes(layer, first, np.zeros((1, 8, 8)))
    S = start = before[-1]
    expected_states = []
    for t in range(len(xs)):
        m = ids[0, t]
        if m >= 0 and (t + 1 == len(xs) or ids[0, t + 1] != m):  # the message's last token: one write
            S = _write(config, layer.tensors, xs[ids[0] == m].mean(axis=0), S)
        expected_states.append(S)
    reads = [_deltas(config, layer.tensors, _read(config, layer.tensors, x, start)) for x in xs]
    _assert_deltas([{h: d[t] for h, d in layer.deltas[-1].items()} for t in range(len(xs))], reads)
    for t, expected in enumerate(expected_states, start=len(first) + 1):
        np.testing.assert_allclose(_state(cache, t, config), expected, **TOL)


def test_normalize_qk_must_be_a_boolean() -> None:
    assert DeltaMemConfig.from_dict({"normalize_qk": False}).normalize_qk is False
    with pytest.raises(AdapterConfigError, match="normalize_qk must be true or false"):
        DeltaMemConfig.from_dict({"normalize_qk": "false"})
