"""Public δ-mem API: attach an adapter to an mlx-lm model, read and control its memory state."""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_unflatten
from mlx_lm.models import cache as mlx_cache

from common.kv_budget import KV_BITS, KV_GROUP_SIZES
from sidecar.delta.adapter_files import ModelDims, load_adapter, model_dims, validate_adapter
from sidecar.delta.attention import DeltaAttention, PlainAttention
from sidecar.delta.cache import DeltaControls, DeltaKVCache, DeltaLayerCache, QuantizedDeltaKVCache
from sidecar.delta.config import AdapterConfigError, DeltaMemConfig, tensor_key
from sidecar.delta.prefixed_kv import PrefixedKVCache, PrefixedQuantizedKVCache

SUPPORTED_MODEL_TYPES = ("qwen3", "qwen2")


@dataclass(frozen=True)
class DeltaMemInfo:
    """What was attached: the adapter config, where it came from, and which layers carry δ."""

    config: DeltaMemConfig
    layers: tuple[int, ...]
    source: str

    def describe(self) -> dict[str, Any]:
        """A JSON-ready summary for /health and status output."""
        return {
            "variant": self.config.variant,
            "rank": self.config.rank,
            "state_heads": self.config.num_state_heads,
            "layers": len(self.layers),
            "state_update_mode": self.config.state_update_mode,
            "delta_heads": list(self.config.delta_heads),
            "source": self.source,
        }


def attach_delta_mem(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Load, validate and attach a δ-mem adapter in place; returns the model."""
    adapter = load_adapter(Path(adapter_dir))
    validate_adapter(adapter, _dims_of(model))
    return attach_tensors(model, adapter.config, adapter.tensors, source=str(adapter.path))


def attach_tensors(
    model: nn.Module, config: DeltaMemConfig, tensors: dict[str, np.ndarray], source: str = "tensors"
) -> nn.Module:
    """Attach already-loaded adapter tensors (keys `model.layers.{i}.self_attn.{name}`)."""
    if getattr(model, "delta_mem", None) is not None:
        raise AdapterConfigError("a δ-mem adapter is already attached to this model")
    model_type = getattr(getattr(model, "args", None), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise AdapterConfigError(
            f"δ-mem supports {', '.join(SUPPORTED_MODEL_TYPES)} models, not {model_type!r}"
        )
    layers = config.targets(len(model.layers))
    for i in layers:
        prefix = tensor_key(i, "")
        layer_tensors = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        block = model.layers[i]
        block.self_attn = DeltaAttention(block.self_attn, config, layer_tensors)
    model.delta_mem = DeltaMemInfo(config, tuple(layers), source)
    model.make_cache = lambda: make_cache(model)
    return model


def wrap_plain_attention(model: nn.Module) -> nn.Module:
    """Run every plain attention layer through `PlainAttention` (call it after attaching any adapter),
    so that every layer attends the sidecar's way: prefill chunks over quantized caches in float, and
    caches that start from a shared prefix over both segments (δ layers already do both)."""
    if getattr(getattr(model, "args", None), "model_type", None) not in SUPPORTED_MODEL_TYPES:
        return model  # other model types keep mlx-lm's own attention (and no shared prefixes)
    for block in model.layers:
        if not isinstance(block.self_attn, (DeltaAttention, PlainAttention)):
            block.self_attn = PlainAttention(block.self_attn)
    return model


def attends_segments(model: nn.Module) -> bool:
    """True when every layer runs the sidecar's attention, so caches may start from a shared prefix."""
    return all(isinstance(block.self_attn, (DeltaAttention, PlainAttention)) for block in model.layers)


def make_cache(model: nn.Module, kv_bits: int | None = None, kv_group_size: int = 64) -> list[Any]:
    """A prompt cache for `model`: float K/V, or mlx-lm's quantized format with `kv_bits` (8 or 4);
    δ layers get a δ record (float32 whatever the K/V format)."""
    if kv_bits is not None:
        check_kv_quantization(model, kv_bits, kv_group_size)
    info = delta_info(model)
    controls = DeltaControls()
    caches: list[Any] = []
    for i, block in enumerate(model.layers):
        delta = info is not None and i in info.layers
        if delta and kv_bits is None:
            caches.append(DeltaKVCache(block.self_attn.state_shape, controls))
        elif delta:
            caches.append(QuantizedDeltaKVCache(block.self_attn.state_shape, controls, kv_group_size, kv_bits))
        elif kv_bits is None:
            caches.append(PrefixedKVCache())
        else:
            caches.append(PrefixedQuantizedKVCache(group_size=kv_group_size, bits=kv_bits))
    return caches


def check_kv_quantization(model: nn.Module, kv_bits: int, kv_group_size: int) -> None:
    """Raise ValueError, naming the setting, when the model's K/V cannot be quantized this way."""
    if kv_bits not in KV_BITS:
        raise ValueError(f"kv_bits must be one of {KV_BITS} (got {kv_bits})")
    if kv_group_size not in KV_GROUP_SIZES:
        raise ValueError(f"kv_group_size must be one of {KV_GROUP_SIZES} (got {kv_group_size})")
    args = model.args
    head_dim = getattr(args, "head_dim", None) or args.hidden_size // args.num_attention_heads
    if head_dim % kv_group_size:
        raise ValueError(f"kv_group_size {kv_group_size} does not divide this model's head_dim {head_dim}")


def restorable_offset(cache: list[Any], offset: int) -> int:
    """The largest offset ≤ `offset` to which the cache can be trimmed with its δ-state exact."""
    return min((c.restorable_offset(offset) for c in cache if isinstance(c, DeltaLayerCache)), default=offset)


def load_prompt_cache(path: str | Path) -> list[Any]:
    """Read a cache written by mlx-lm's save_prompt_cache, δ layers included (one shared set of controls)."""
    arrays, metadata = mx.load(str(path), return_metadata=True)
    _, classes, scalars = tree_unflatten(list(metadata.items()))
    for position, kind in scalars[1:]:  # the caches' scalars are numbers or None
        arrays[position] = None if kind == "none" else arrays[position].item()
    known = {
        "DeltaKVCache": DeltaKVCache,
        "QuantizedDeltaKVCache": QuantizedDeltaKVCache,
        "PrefixedKVCache": PrefixedKVCache,
        "PrefixedQuantizedKVCache": PrefixedQuantizedKVCache,
    }
    states = tree_unflatten(list(arrays.items()))
    cache = [(known.get(name) or getattr(mlx_cache, name)).from_state(state) for name, state in zip(classes, states)]
    controls = DeltaControls()
    for c in cache:
        if isinstance(c, DeltaLayerCache):
            c.controls = controls
    return cache


def delta_info(model: nn.Module) -> DeltaMemInfo | None:
    """The attached adapter's description, or None for a plain model."""
    return getattr(model, "delta_mem", None)


def delta_states(model: nn.Module, cache: list[Any]) -> list[mx.array]:
    """The current δ-state of each δ layer, in layer order ([B, r, r], or [B, heads, r, r])."""
    return [cache[i].current_state() for i in _layers(model)]


def delta_states_at(model: nn.Module, cache: list[Any], offset: int) -> list[mx.array]:
    """The δ-state of each δ layer after the first `offset` cached tokens (MissingDeltaState where not kept)."""
    if not 0 <= offset <= cache[0].offset:
        raise ValueError(f"offset {offset} is outside the cache's {cache[0].offset} tokens")
    return [cache[i].state_at(offset, 1) for i in _layers(model)]


def delta_record_nbytes(cache: list[Any]) -> int:
    """Bytes of the δ records in a cache (the rest of its nbytes is K/V)."""
    return sum(c.delta_nbytes for c in cache if isinstance(c, DeltaLayerCache))


def set_delta_states(model: nn.Module, cache: list[Any], states: list[mx.array]) -> None:
    """Replace the current δ-state of each δ layer (same order and shapes as delta_states)."""
    layers = _layers(model)
    if len(states) != len(layers):
        raise ValueError(f"expected {len(layers)} layer states, got {len(states)}")
    for i, state in zip(layers, states):
        expected = (state.shape[0], *cache[i].state_shape)
        if tuple(state.shape) != expected:
            raise ValueError(f"layer {i}: state shape {tuple(state.shape)} is not {expected}")
        cache[i].set_current_state(state)


def delta_state_stats(model: nn.Module, cache: list[Any]) -> list[dict[str, Any]]:
    """Per δ layer: Frobenius norm, largest magnitude and non-zero count of the current state."""
    states = delta_states(model, cache)
    mx.eval(states)
    return [{"layer": layer, **state_stats(s)} for layer, s in zip(_layers(model), states)]


def state_stats(state: Any) -> dict[str, Any]:
    """Frobenius norm, largest magnitude, non-zero count and sha256 of one state (an MLX or NumPy array).

    The sha256 covers the state's float32 values, so two runs can be compared exactly (bench.chaos)."""
    s = mx.array(state)
    exact = np.ascontiguousarray(np.array(s.astype(mx.float32)))
    return {
        "norm": float(mx.sqrt(mx.sum(s * s))),
        "max_abs": float(mx.max(mx.abs(s))),
        "nonzero": int(mx.sum(s != 0)),
        "sha256": hashlib.sha256(exact.tobytes()).hexdigest(),
    }


def set_delta_controls(
    cache: list[Any],
    *,
    enabled: bool = True,
    write: bool = True,
    message_ids: np.ndarray | None = None,
    keep: Iterable[int] = (),
) -> None:
    """Switch δ on/off, writes on/off, set message ids (SSW) and the offsets whose δ-state must be
    kept exactly (message starts) for the next calls on `cache`."""
    controls = _controls(cache)
    controls.enabled = enabled
    controls.write = write
    controls.message_ids = None if message_ids is None else np.asarray(message_ids)
    controls.keep = frozenset(keep)


@contextmanager
def delta_controls(cache: list[Any], **settings: Any) -> Iterator[None]:
    """Apply set_delta_controls for the duration of a block, then restore the previous switches."""
    controls = _controls(cache)
    saved = (controls.enabled, controls.write, controls.message_ids, controls.keep)
    set_delta_controls(cache, **settings)
    try:
        yield
    finally:
        controls.enabled, controls.write, controls.message_ids, controls.keep = saved


def write_context(model: nn.Module, cache: list[Any], tokens: list[int]) -> None:
    """Write tokens into the δ-state only: a forward pass whose KV entries are dropped afterwards."""
    if not tokens:
        return
    # One message for message-mean adapters; token adapters ignore the ids. The state before the
    # write is kept, so that a rollback to just before it stays exact.
    ids = np.zeros((1, len(tokens)), dtype=np.int64)
    with delta_controls(cache, message_ids=ids, keep=(cache[0].offset,)):
        model.model(mx.array([tokens]), cache)  # the inner model: no logits are needed
    states = delta_states(model, cache)
    mx.eval(states)
    for c in cache:
        c.trim(len(tokens))
    set_delta_states(model, cache, states)


def _layers(model: nn.Module) -> tuple[int, ...]:
    info = delta_info(model)
    if info is None:
        raise AdapterConfigError("no δ-mem adapter is attached to this model")
    return info.layers


def _controls(cache: list[Any]) -> DeltaControls:
    for c in cache:
        if isinstance(c, DeltaLayerCache):
            return c.controls
    raise ValueError("this cache has no δ layers: build it with make_prompt_cache(model)")


def _dims_of(model: nn.Module) -> ModelDims:
    args = model.args
    return model_dims(
        {
            "hidden_size": args.hidden_size,
            "num_hidden_layers": args.num_hidden_layers,
            "num_attention_heads": args.num_attention_heads,
            "num_key_value_heads": args.num_key_value_heads,
            "head_dim": getattr(args, "head_dim", None),
        }
    )
