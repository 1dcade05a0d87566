"""Quantized KV without the prefill penalty: prefill chunks attend in float over the dequantized K/V,
decoding keeps mlx-lm's quantized attention, and the tokens are those of mlx-lm's quantized path."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models import base as mlx_base
from mlx_lm.models.base import scaled_dot_product_attention
from mlx_lm.utils import load_model

from sidecar.delta import attach_delta_mem
from sidecar.delta import attention as delta_attention
from sidecar.delta.api import make_cache, set_delta_controls, wrap_plain_attention
from sidecar.delta.attention import PlainAttention
from sidecar.delta.batch import decode_rows
from sidecar.testing.tiny_model import write_tiny_adapter

CHUNKS = ((0, 7), (7, 70), (70, 71), (71, 150))  # one token, long and short chunks
ANSWER_TOKENS = 12
# float32 logits of the two paths (MLX 0.32 on CPU gives identical ones: the same products in the
# same order; other backends may sum in another order).
LOGITS_ATOL = 1e-4


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory, tiny_kv_model_dir: Path) -> dict[str, Path]:
    """TSW, SSW and MSW adapters for the head_dim-64 tiny model (the one KV quantization can group)."""
    root = tmp_path_factory.mktemp("kv-prefill-adapters")
    return {
        variant: write_tiny_adapter(root / variant, tiny_kv_model_dir, variant=variant, seed=11 + i)
        for i, variant in enumerate(("tsw", "ssw", "msw"))
    }


def _tokens(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, 700, size=n).tolist()


_OLD_PATH_CHUNKS: list[int] = []


def _mlx_lm_attention(queries, keys, values, cache, scale, mask):  # noqa: ANN001, ANN202
    """Today's path: mlx-lm's dispatch, quantized attention for every chunk."""
    _OLD_PATH_CHUNKS.append(queries.shape[2])
    return scaled_dot_product_attention(queries, keys, values, cache=cache, scale=scale, mask=mask)


def _generate(model: Any, bits: int | None, delta: bool, ssw: bool = False) -> tuple[list[int], np.ndarray]:
    """Prefill in CHUNKS, then decode greedily: the answer's tokens and every logit row [steps, vocab]."""
    cache = make_cache(model, bits)
    prompt = _tokens(CHUNKS[-1][1])
    rows = []
    for a, b in CHUNKS:
        if getattr(model, "delta_mem", None) is not None:
            ids = [[(a + i) // 25 for i in range(b - a)]] if ssw else None  # messages of 25 tokens
            set_delta_controls(cache, enabled=delta, message_ids=ids)
        logits = model(mx.array([prompt[a:b]]), cache=cache)
        rows.append(logits[0])
    answer = []
    for _ in range(ANSWER_TOKENS):
        answer.append(int(mx.argmax(rows[-1][-1]).item()))
        if getattr(model, "delta_mem", None) is not None:
            set_delta_controls(cache, enabled=delta)
        rows.append(model(mx.array([answer[-1:]]), cache=cache)[0])
    return answer, np.array(mx.concatenate(rows))


def _identical(a: mx.array, b: mx.array) -> None:
    np.testing.assert_array_equal(np.array(a), np.array(b))


def _both_paths(monkeypatch: pytest.MonkeyPatch, run: Callable[[], Any]) -> tuple[Any, Any]:
    """`run()` with float prefill attention (the code as it is), then with mlx-lm's quantized attention."""
    new = run()
    _OLD_PATH_CHUNKS.clear()
    with monkeypatch.context() as patch:
        patch.setattr(delta_attention, "attention", _mlx_lm_attention)
        old = run()
    assert max(_OLD_PATH_CHUNKS) == max(b - a for a, b in CHUNKS)  # the reference really ran the old path
    return new, old


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("variant", ["tsw", "ssw", "msw"])
@pytest.mark.parametrize("delta", [True, False])
def test_float_prefill_gives_the_tokens_of_the_quantized_path(
    monkeypatch: pytest.MonkeyPatch, tiny_kv_model_dir: Path, adapters: dict[str, Path], variant: str, delta: bool,
    bits: int,
) -> None:  # fmt: skip
    model = attach_delta_mem(load_model(tiny_kv_model_dir)[0], adapters[variant])
    (new_tokens, new_logits), (old_tokens, old_logits) = _both_paths(
        monkeypatch, lambda: _generate(model, bits, delta, ssw=variant == "ssw")
    )
    assert new_tokens == old_tokens
    np.testing.assert_allclose(new_logits, old_logits, atol=LOGITS_ATOL, rtol=0)
    float_tokens, float_logits = _generate(model, None, delta, ssw=variant == "ssw")
    # The check above means something: quantization moved the logits by far more than the paths differ.
    assert np.abs(new_logits - float_logits).max() > 20 * np.abs(new_logits - old_logits).max()


@pytest.mark.parametrize("bits", [8, 4])
def test_a_model_without_adapter_prefills_in_float_with_the_same_tokens(
    monkeypatch: pytest.MonkeyPatch, tiny_kv_model_dir: Path, bits: int
) -> None:
    plain = load_model(tiny_kv_model_dir)[0]
    old_tokens, old_logits = _generate(plain, bits, delta=False)  # mlx-lm's own modules
    model = wrap_plain_attention(load_model(tiny_kv_model_dir)[0])
    assert all(type(block.self_attn) is PlainAttention for block in model.layers)
    new_tokens, new_logits = _generate(model, bits, delta=False)
    assert new_tokens == old_tokens
    np.testing.assert_allclose(new_logits, old_logits, atol=LOGITS_ATOL, rtol=0)


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_qwen2_model_dir"])
def test_plain_attention_is_the_modules_own_forward_bit_for_bit(request: pytest.FixtureRequest, fixture: str) -> None:
    model_dir = request.getfixturevalue(fixture)
    plain = load_model(model_dir)[0]
    wrapped = wrap_plain_attention(load_model(model_dir)[0])
    plain_cache, wrapped_cache = make_cache(plain), make_cache(wrapped)
    for a, b in CHUNKS + ((150, 151),):
        tokens = mx.array([_tokens(151)[a:b]])
        _identical(wrapped(tokens, cache=wrapped_cache), plain(tokens, cache=plain_cache))
    _identical(wrapped(mx.array([_tokens(9)])), plain(mx.array([_tokens(9)])))  # no cache at all


def test_delta_off_runs_the_base_modules_forward_bit_for_bit(tiny_model_dir: Path, tiny_adapter_dir: Path) -> None:
    plain = load_model(tiny_model_dir)[0]
    model = attach_delta_mem(load_model(tiny_model_dir)[0], tiny_adapter_dir)
    plain_cache, cache = make_cache(plain), make_cache(model)
    set_delta_controls(cache, enabled=False)
    for a, b in CHUNKS:
        tokens = mx.array([_tokens(150)[a:b]])
        _identical(model(tokens, cache=cache), plain(tokens, cache=plain_cache))


@pytest.mark.parametrize("adapter", [False, True])
def test_prefill_chunks_skip_mlx_lm_quantized_attention_and_decoding_uses_it(
    monkeypatch: pytest.MonkeyPatch, tiny_kv_model_dir: Path, tiny_kv_adapter_dir: Path, adapter: bool
) -> None:
    calls: list[int] = []
    quantized = mlx_base.quantized_scaled_dot_product_attention

    def counted(queries, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        calls.append(queries.shape[2])
        return quantized(queries, *args, **kwargs)

    monkeypatch.setattr(mlx_base, "quantized_scaled_dot_product_attention", counted)
    model = load_model(tiny_kv_model_dir)[0]
    if adapter:
        attach_delta_mem(model, tiny_kv_adapter_dir)
    wrap_plain_attention(model)
    caches = [make_cache(model, 8) for _ in range(2)]
    for cache in caches:
        model(mx.array([_tokens(30)]), cache=cache)
    assert calls == []
    model(mx.array([[5]]), cache=caches[0])
    decode_rows(model, mx.array([5, 6]), caches, [adapter, adapter])
    assert calls == [1] * 3 * len(model.layers)
