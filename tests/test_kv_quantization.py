"""Quantized KV with δ-mem: mlx-lm's quantized format and attention, a float32 δ record, exact reuse."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import QuantizedKVCache, save_prompt_cache, trim_prompt_cache
from mlx_lm.utils import load_model

from common.kv_budget import KvShape, cache_tokens, delta_record_bytes, kv_bytes_per_token
from sidecar.delta import attach_delta_mem, delta_states
from sidecar.delta.api import load_prompt_cache, make_cache, restorable_offset, set_delta_controls
from sidecar.delta.cache import QuantizedDeltaKVCache
from sidecar.delta.prefixed_kv import PrefixedQuantizedKVCache
from sidecar.testing.tiny_model import write_tiny_adapter, write_tiny_model

BITS = [None, 8, 4]


@pytest.fixture
def model(tiny_kv_model_dir: Path, tiny_kv_adapter_dir: Path):
    model, _ = load_model(tiny_kv_model_dir)
    return attach_delta_mem(model, tiny_kv_adapter_dir)


def _tokens(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, 700, size=n).tolist()


def _run(model, cache, tokens: list[int]) -> mx.array:
    return model(mx.array([tokens]), cache=cache)


def _same(a: mx.array, b: mx.array, atol: float = 1e-5) -> None:
    np.testing.assert_allclose(np.array(a), np.array(b), atol=atol, rtol=0)


@pytest.mark.parametrize("bits", BITS)
def test_bytes_are_what_the_budget_arithmetic_says(model, tiny_kv_model_dir, tiny_kv_adapter_dir, bits) -> None:
    cache = make_cache(model, bits)
    _run(model, cache, _tokens(300))
    shape = KvShape.from_dirs(tiny_kv_model_dir, tiny_kv_adapter_dir)
    kv = sum(c.nbytes - c.delta_nbytes for c in cache)
    assert kv == cache_tokens(300) * kv_bytes_per_token(shape, bits)
    assert sum(c.delta_nbytes for c in cache) == delta_record_bytes(shape, 300)
    assert all(c.record.latest.dtype == mx.float32 for c in cache)


@pytest.mark.parametrize("bits", BITS)
def test_bf16_bytes_are_what_the_budget_arithmetic_says(tmp_path: Path, bits) -> None:
    """The preset's dtype: K/V, scales and biases in bfloat16 (2 bytes), the δ record in float32."""
    model_dir = write_tiny_model(tmp_path / "model", head_dim=64, dtype="bfloat16")
    adapter_dir = write_tiny_adapter(tmp_path / "adapter", model_dir, seed=5)
    model = attach_delta_mem(load_model(model_dir)[0], adapter_dir)
    cache = make_cache(model, bits)
    _run(model, cache, _tokens(300))
    shape = KvShape.from_dirs(model_dir, adapter_dir)
    scales_or_keys = cache[0].keys[-1] if bits else cache[0].keys
    assert shape.dtype_bytes == 2 and scales_or_keys.dtype == mx.bfloat16
    kv = sum(c.nbytes - c.delta_nbytes for c in cache)
    assert kv == cache_tokens(300) * kv_bytes_per_token(shape, bits)
    # (bits/8 + 2·2/64) / 2 of the float bytes: 8-bit 0.53, 4-bit 0.28 of bf16.
    float_kv = cache_tokens(300) * 2 * shape.layers * shape.kv_heads * shape.head_dim * 2
    assert kv / float_kv == (1.0 if bits is None else (bits / 8 + 4 / 64) / 2)
    assert sum(c.delta_nbytes for c in cache) == delta_record_bytes(shape, 300)
    assert all(c.record.latest.dtype == mx.float32 for c in cache)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_caches_hold_a_fraction_of_the_float_bytes(model, bits) -> None:
    tokens = _tokens(256)
    float_cache, quantized = make_cache(model), make_cache(model, bits)
    _run(model, float_cache, tokens)
    _run(model, quantized, tokens)
    assert all(isinstance(c, QuantizedDeltaKVCache) and c.bits == bits for c in quantized)
    ratio = sum(c.nbytes - c.delta_nbytes for c in quantized) / sum(c.nbytes - c.delta_nbytes for c in float_cache)
    # float32 K/V here: (bits/8 + 2·4/64) / 4 of the float bytes.
    assert ratio == pytest.approx((bits / 8 + 8 / 64) / 4)


@pytest.mark.parametrize("bits", [8, 4])
def test_chunking_and_rollback_give_what_a_fresh_quantized_run_gives(model, bits) -> None:
    tokens, other = _tokens(200), _tokens(200, seed=1)
    reference = make_cache(model, bits)
    expected = _run(model, reference, tokens[:90] + other[90:160])

    cache = make_cache(model, bits)
    for a, b in ((0, 7), (7, 70), (70, 71), (71, 150)):
        _run(model, cache, tokens[a:b])
    start = restorable_offset(cache, 90)
    trim_prompt_cache(cache, 150 - start)
    _run(model, cache, tokens[start:90])
    continued = _run(model, cache, other[90:160])
    _same(continued, expected[:, 90:])
    for a, b in zip(delta_states(model, cache), delta_states(model, reference)):
        _same(a, b)


def test_quantized_attention_stays_close_to_float_and_8_bits_closer_than_4(model) -> None:
    tokens = _tokens(120)
    logits = {bits: _run(model, make_cache(model, bits), tokens) for bits in BITS}
    diff = {bits: float(mx.abs(logits[bits] - logits[None]).max()) for bits in (8, 4)}
    spread = float(mx.abs(logits[None]).max())
    assert 0 < diff[8] < diff[4] < 0.5 * spread
    assert diff[8] < 0.05 * spread


def test_to_quantized_moves_the_delta_record_over(model) -> None:
    tokens, more = _tokens(100), _tokens(10, seed=3)
    float_cache, cache = make_cache(model), make_cache(model)
    _run(model, float_cache, tokens)
    _run(model, cache, tokens)
    quantized = [c.to_quantized(group_size=64, bits=8) for c in cache]  # replaces `cache`, as in mlx-lm
    assert all(q.record is c.record and q.offset == 100 for q, c in zip(quantized, cache))
    float_out, quantized_out = _run(model, float_cache, more), _run(model, quantized, more)
    assert 0 < float(mx.abs(quantized_out - float_out).max()) < 0.05 * float(mx.abs(float_out).max())


@pytest.mark.parametrize("bits", BITS)
def test_a_saved_prompt_cache_continues_exactly(model, tmp_path: Path, bits) -> None:
    cache = make_cache(model, bits)
    set_delta_controls(cache, keep=[30])
    _run(model, cache, _tokens(100))
    path = tmp_path / "cache.safetensors"
    save_prompt_cache(str(path), cache)  # mlx-lm's own writer
    loaded = load_prompt_cache(path)
    assert [type(c) for c in loaded] == [type(c) for c in cache]
    assert loaded[0].controls is loaded[1].controls
    assert restorable_offset(loaded, 40) == 30  # the record's runs survive the round trip
    more = _tokens(10, seed=4)
    _same(_run(model, loaded, more), _run(model, cache, more), atol=0)


def test_a_group_size_the_head_dim_cannot_take_is_refused(tiny_model_dir, tiny_adapter_dir) -> None:
    model, _ = load_model(tiny_model_dir)  # head_dim 16
    attach_delta_mem(model, tiny_adapter_dir)
    with pytest.raises(ValueError, match="kv_group_size 64 does not divide this model's head_dim 16"):
        make_cache(model, 8)


def test_a_plain_model_gets_mlx_lm_quantized_caches(tiny_kv_model_dir) -> None:
    model, _ = load_model(tiny_kv_model_dir)
    cache = make_cache(model, 4, 32)
    # mlx-lm's format, in the subclass that can start from a shared prefix
    assert all(type(c) is PrefixedQuantizedKVCache and isinstance(c, QuantizedKVCache) for c in cache)
    assert all((c.bits, c.group_size) == (4, 32) for c in cache)
    _run(model, cache, _tokens(20))
    assert cache[0].offset == 20
