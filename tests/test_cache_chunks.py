"""Chunks of a prompt cache put back together give the same cache: K/V, δ-states and next logits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx_lm
import pytest
from mlx.utils import tree_flatten

from sidecar.delta.api import (
    attach_delta_mem,
    delta_states,
    delta_states_at,
    make_cache,
    restorable_offset,
    set_delta_controls,
    write_context,
)
from sidecar.delta.cache_chunks import CacheChunk, cache_chunk, cache_layout, check_chunk, fill_cache

TOKENS = list(range(5, 305))


def max_diff(a: list[mx.array], b: list[mx.array]) -> float:
    return max(float(mx.max(mx.abs(x - y))) for x, y in zip(a, b, strict=True))


def kv_arrays(layer: Any) -> list[mx.array]:
    """A layer's keys and values (float, or mlx-lm's quantized triples) as flat arrays."""
    return [array[..., : layer.offset, :] for _, array in tree_flatten(list(layer.state[:2]))]


def turns(model: Any, bits: int | None) -> tuple[list[Any], list[Any]]:
    """A cache written in two turns, the second cut back into the first and starting with a memory
    write (as OpenClaw's turns go); and the chunks that hold it."""
    cache = make_cache(model, bits, 32)
    set_delta_controls(cache, keep=[37, 38])
    model(mx.array([TOKENS[:200]]), cache=cache)
    first = cache_chunk(cache, 0)
    cut = restorable_offset(cache, 150)
    for layer in cache:
        layer.trim(layer.offset - cut)
    write_context(model, cache, [9, 10, 11])
    model(mx.array([TOKENS[cut:260]]), cache=cache)
    return cache, [first.cut(cut), cache_chunk(cache, cut)]


@pytest.mark.parametrize("bits", [None, 8])
def test_chunks_rebuild_the_cache_they_came_from(
    tiny_kv_model_dir: Path, tiny_kv_adapter_dir: Path, bits: int | None
) -> None:
    model, _ = mlx_lm.load(str(tiny_kv_model_dir))
    attach_delta_mem(model, tiny_kv_adapter_dir)
    original, chunks = turns(model, bits)
    restored = make_cache(model, bits, 32)
    fill_cache(restored, chunks)
    assert restored[0].offset == original[0].offset == 260
    assert max_diff(delta_states(model, restored), delta_states(model, original)) == 0
    for offset in (38, 64, 128, chunks[1].start, 192, 256):  # kept states, before and after the memory write
        assert max_diff(delta_states_at(model, restored, offset), delta_states_at(model, original, offset)) == 0
    for a, b in zip(restored, original):
        assert max_diff(kv_arrays(a), kv_arrays(b)) == 0
    probe = mx.array([[3, 4, 5]])
    assert max_diff([model(probe, cache=restored)], [model(probe, cache=original)]) == 0


def test_a_chunk_used_only_in_part_keeps_the_states_up_to_its_cut(
    tiny_kv_model_dir: Path, tiny_kv_adapter_dir: Path
) -> None:
    model, _ = mlx_lm.load(str(tiny_kv_model_dir))
    attach_delta_mem(model, tiny_kv_adapter_dir)
    original, chunks = turns(model, None)
    restored = make_cache(model, None, 32)
    fill_cache(restored, [chunks[0], chunks[1].cut(250)])
    assert restored[0].offset == 250
    assert restorable_offset(restored, 250) == 192  # the δ-state at 250 was not kept: back to the last kept one
    for layer in restored:
        layer.trim(layer.offset - 192)
    assert max_diff(delta_states(model, restored), delta_states_at(model, original, 192)) == 0


@pytest.mark.parametrize("bits", [None, 8])
def test_a_chunk_is_checked_against_the_model_cache_layout(
    tiny_kv_model_dir: Path, tiny_kv_adapter_dir: Path, bits: int | None
) -> None:
    model, _ = mlx_lm.load(str(tiny_kv_model_dir))
    attach_delta_mem(model, tiny_kv_adapter_dir)
    layout = cache_layout(model, make_cache(model, bits, 32))
    original, chunks = turns(model, bits)
    check_chunk(cache_chunk(original, 0), layout)
    good = chunks[1]
    check_chunk(good, layout)
    broken = {
        "one KV head fewer": {**good.arrays, "k0.0": good.arrays["k0.0"][:, :1]},
        "another dtype": {**good.arrays, "v1.0": good.arrays["v1.0"].astype(mx.float16)},
        "a layer missing": {k: v for k, v in good.arrays.items() if not k.startswith(("k1.", "v1."))},
        "δ-states of another shape": {**good.arrays, "latest0": mx.zeros((1, 3, 3))},
        "a stray array": {**good.arrays, "extra": mx.zeros((1,))},
    }
    for arrays in broken.values():
        with pytest.raises(ValueError):
            check_chunk(CacheChunk(good.start, good.end, arrays, good.records), layout)
    with pytest.raises(ValueError, match="layers"):
        check_chunk(CacheChunk(good.start, good.end, good.arrays, good.records[:-1]), layout)
