"""δ-mem adapter files on disk: load (npz or torch `.pt`), convert, and validate against a model's dims.

Numpy in, numpy out: the installer uses this module without loading MLX or a model.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import UserError
from common.files import atomic_write_bytes
from sidecar.delta.config import CONFIG_FILE, DeltaMemConfig, tensor_key, tensor_names
from sidecar.delta.torch_archive import (
    TorchArchiveError,
    UnsafeArchiveError,
    bfloat16_bits_to_float32,
    read_torch_archive,
)

NPZ_FILE = "delta_mem_adapter_mlx.npz"
PT_FILE = "delta_mem_adapter.pt"

_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.self_attn\.")


class AdapterError(UserError, ValueError):
    """An adapter directory that cannot be used: missing files, missing tensors or wrong shapes."""

    topic = "adapter"


@dataclass
class LoadedAdapter:
    """An adapter read from disk; `path` is the tensor file the tensors came from."""

    path: Path
    config: DeltaMemConfig
    tensors: dict[str, np.ndarray]


@dataclass(frozen=True)
class ModelDims:
    """The model dimensions an adapter's shapes depend on."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


def load_adapter(adapter_dir: Path) -> LoadedAdapter:
    """Read the config and the tensors (the `.npz` if present, else the `.pt`) as float32 numpy."""
    adapter_dir = Path(adapter_dir)
    config = _read_config(adapter_dir)
    npz, pt = adapter_dir / NPZ_FILE, adapter_dir / PT_FILE
    if npz.is_file():
        return LoadedAdapter(npz, config, _read_npz(npz))
    if pt.is_file():
        return LoadedAdapter(pt, config, _read_pt(pt))
    raise AdapterError(
        f"{adapter_dir} has no adapter weights: expected {NPZ_FILE} or {PT_FILE}; download the adapter again"
    )


def convert_adapter(adapter_dir: Path) -> Path:
    """Convert `delta_mem_adapter.pt` to `delta_mem_adapter_mlx.npz` (float32) without torch."""
    adapter_dir = Path(adapter_dir)
    pt = adapter_dir / PT_FILE
    if not pt.is_file():
        raise AdapterError(f"{pt} does not exist: nothing to convert")
    buffer = io.BytesIO()
    np.savez(buffer, **_read_pt(pt))
    npz = adapter_dir / NPZ_FILE
    atomic_write_bytes(npz, buffer.getvalue())
    return npz


def model_dims(config: dict[str, Any]) -> ModelDims:
    """The dims of a Hugging Face model `config.json` dict (head_dim defaults to hidden / heads)."""
    required = ("hidden_size", "num_hidden_layers", "num_attention_heads")
    bad = [key for key in required if not isinstance(config.get(key), int) or config[key] < 1]
    if bad:
        raise AdapterError(f"the model's config.json lacks a positive integer {', '.join(bad)}")
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    return ModelDims(
        hidden_size=hidden,
        num_layers=config["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or hidden // heads),
    )


def expected_shapes(config: DeltaMemConfig, dims: ModelDims) -> dict[str, tuple[int, ...]]:
    """Shape of every per-layer tensor an adapter with this config may hold, by tensor name."""
    memory, gates, hidden = config.memory_dim, config.gate_dim, dims.hidden_size
    shapes: dict[str, tuple[int, ...]] = {
        "memory_q_proj": (memory, hidden),
        "memory_k_proj": (memory, hidden),
        "memory_v_proj": (memory, hidden),
        "delta_q_proj": (dims.num_heads * dims.head_dim, memory),
        "delta_k_proj": (dims.num_kv_heads * dims.head_dim, memory),
        "delta_v_proj": (dims.num_kv_heads * dims.head_dim, memory),
        "delta_o_proj": (hidden, memory),
        "beta_proj": (gates, hidden),
        "beta_bias": (gates,),
    }
    if not config.couple_lambda:
        shapes["lambda_proj"] = (gates, hidden)
        shapes["lambda_bias"] = (gates,)
    return shapes


def validate_adapter(adapter: LoadedAdapter, dims: ModelDims) -> None:
    """Check that the adapter fits the model: every needed tensor present, shaped right, finite."""
    config = adapter.config
    targets = config.targets(dims.num_layers)
    present = sorted({int(m.group(1)) for key in adapter.tensors if (m := _LAYER_KEY.match(key))})
    beyond = [layer for layer in present if layer >= dims.num_layers]
    uncovered = [layer for layer in targets if layer not in present]
    if beyond or (present and uncovered):
        raise AdapterError(
            f"{adapter.path}: the adapter has tensors for layers {_layer_span(present)} but the model "
            f"has {dims.num_layers} layers and the config targets {_layer_span(targets)}: "
            "this adapter was made for a different model"
        )
    shapes = expected_shapes(config, dims)
    for layer in targets:
        for name in tensor_names(config):
            key = tensor_key(layer, name)
            expected = shapes[name]
            tensor = adapter.tensors.get(key)
            if tensor is None:
                raise AdapterError(
                    f"{adapter.path}: tensor {key} is missing (expected shape {list(expected)})"
                )
            if tuple(tensor.shape) != expected:
                raise AdapterError(
                    f"{adapter.path}: tensor {key} has shape {list(tensor.shape)}, expected "
                    f"{list(expected)} for this model (hidden {dims.hidden_size}, {dims.num_heads} heads, "
                    f"{dims.num_kv_heads} KV heads, head_dim {dims.head_dim}) and config (rank "
                    f"{config.rank}, {config.num_state_heads} state heads): the adapter does not match"
                )
            if not np.isfinite(tensor).all():
                raise AdapterError(f"{adapter.path}: tensor {key} contains NaN or infinite values")


def _read_config(adapter_dir: Path) -> DeltaMemConfig:
    path = adapter_dir / CONFIG_FILE
    if not path.is_file():
        raise AdapterError(f"{path} does not exist: an adapter needs its {CONFIG_FILE}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise AdapterError(f"{path} must hold a JSON object")
    return DeltaMemConfig.from_dict(data)


def _read_pt(path: Path) -> dict[str, np.ndarray]:
    # A damaged file is an adapter problem (download it again); a refused global is not, so
    # UnsafeArchiveError keeps its own type.
    try:
        tensors = read_torch_archive(path)
    except UnsafeArchiveError:
        raise
    except TorchArchiveError as exc:
        raise AdapterError(str(exc)) from exc
    return {key: value.astype(np.float32, copy=False) for key, value in tensors.items()}


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (ValueError, TypeError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise AdapterError(
            f"{path} is not a readable numpy archive ({exc}); convert or download it again"
        ) from None
    return {key: _npz_float32(path, key, array) for key, array in arrays.items()}


def _npz_float32(path: Path, key: str, array: np.ndarray) -> np.ndarray:
    # MLX saves bfloat16 as 2-byte void records (little-endian), which numpy cannot interpret.
    if array.dtype == np.dtype("V2"):
        return bfloat16_bits_to_float32(array.view("<u2"))
    if array.dtype.kind not in "fiub":
        raise AdapterError(f"{path}: tensor {key} has unsupported dtype {array.dtype}")
    return array.astype(np.float32)


def _layer_span(layers: list[int]) -> str:
    if not layers:
        return "none"
    if len(layers) > 2 and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return ", ".join(str(layer) for layer in layers)
