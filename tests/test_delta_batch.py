"""decode_rows: B rows stepped together equal each row stepped alone with the model's own forward."""

from __future__ import annotations

import copy
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import load_model

from sidecar.delta import attach_delta_mem, delta_states
from sidecar.delta.api import set_delta_controls
from sidecar.delta.batch import decode_rows

ATOL = 1e-5
LENGTHS = (5, 40, 17, 90)


def _rows(model, delta: list[bool], with_adapter: bool) -> list[list]:
    """One cache per row, prompts of different lengths; rows with δ off are switched off after a δ
    prefill, so that their caches hold a state they must neither read nor change."""
    rng = np.random.default_rng(0)
    caches = []
    for length, on in zip(LENGTHS, delta):
        cache = make_prompt_cache(model)
        model(mx.array(rng.integers(0, 700, (1, length))), cache=cache)
        if with_adapter:
            set_delta_controls(cache, enabled=on)
        mx.eval([c.state for c in cache])
        caches.append(cache)
    return caches


@pytest.mark.parametrize(
    ("model_dir", "adapter_dir"),
    [
        ("tiny_model_dir", "tiny_adapter_dir"),
        ("tiny_model_dir", "tiny_ssw_adapter_dir"),
        ("tiny_model_dir", "tiny_msw_adapter_dir"),
        ("tiny_qwen2_model_dir", "tiny_qwen2_adapter_dir"),
        ("tiny_tied_model_dir", "tiny_tied_adapter_dir"),  # Qwen3-4B's output projection: the embedding
        ("tiny_model_dir", None),
    ],
)
def test_rows_stepped_together_equal_each_row_stepped_alone(
    request: pytest.FixtureRequest, model_dir: str, adapter_dir: str | None
) -> None:
    model, _ = load_model(Path(request.getfixturevalue(model_dir)))
    assert hasattr(model, "lm_head") is not model.args.tie_word_embeddings
    if adapter_dir is not None:
        attach_delta_mem(model, request.getfixturevalue(adapter_dir))
    delta = [True, False, True, True] if adapter_dir else [False] * len(LENGTHS)
    together = _rows(model, delta, adapter_dir is not None)
    alone = copy.deepcopy(together)
    before = [delta_states(model, cache) if adapter_dir else [] for cache in together]
    tokens = mx.array([3, 9, 27, 81])
    for _ in range(6):
        batched = decode_rows(model, tokens, together, delta)
        single = mx.concatenate([model(tokens[i : i + 1, None], cache=cache)[:, -1] for i, cache in enumerate(alone)])
        np.testing.assert_allclose(np.array(batched), np.array(single), atol=ATOL, rtol=0)
        tokens = mx.argmax(single, axis=-1)
    for i, (a, b) in enumerate(zip(together, alone)):
        assert a[0].offset == b[0].offset == LENGTHS[i] + 6
        if adapter_dir is None:
            continue
        for x, y in zip(delta_states(model, a), delta_states(model, b)):
            np.testing.assert_allclose(np.array(x), np.array(y), atol=ATOL, rtol=0)
        if not delta[i]:
            # δ off: the state is exactly what it was before the steps.
            for x, y in zip(delta_states(model, a), before[i]):
                assert np.array_equal(np.array(x), np.array(y))
