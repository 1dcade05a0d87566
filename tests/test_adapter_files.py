"""Adapter files: load (npz, pt, bf16 npz), convert, model dims, expected shapes and validation errors."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import zipfile
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from installer.errors import describe
from sidecar.delta.adapter_files import (
    NPZ_FILE,
    PT_FILE,
    AdapterError,
    LoadedAdapter,
    ModelDims,
    convert_adapter,
    expected_shapes,
    load_adapter,
    model_dims,
    validate_adapter,
)
from sidecar.delta.config import CONFIG_FILE, AdapterConfigError, DeltaMemConfig
from sidecar.delta.torch_archive import UnsafeArchiveError
from sidecar.testing.tiny_model import write_tiny_adapter

PARITY = Path(__file__).resolve().parent / "parity"
PARITY_CASES = ["tsw_model", "ssw_model", "msw_model"]
TINY_DIMS = ModelDims(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)
KEY = "model.layers.1.self_attn.memory_k_proj"


@pytest.fixture
def adapter_copy(tmp_path: Path, tiny_adapter_dir: Path) -> Path:
    """A private copy of the session TSW adapter (npz + pt) that a test may change."""
    return Path(shutil.copytree(tiny_adapter_dir, tmp_path / "adapter"))


def pt_only(source: Path, dest: Path) -> Path:
    dest.mkdir(parents=True)
    shutil.copy(source / CONFIG_FILE, dest)
    shutil.copy(source / PT_FILE, dest)
    return dest


def save_npz(path: Path, tensors: dict[str, np.ndarray]) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **tensors)
    path.write_bytes(buffer.getvalue())


def parity_dims(case: str) -> ModelDims:
    return model_dims(json.loads((PARITY / case / "model" / "config.json").read_text()))


# --- loading --------------------------------------------------------------------------------------


def test_load_prefers_the_npz(tiny_adapter_dir: Path) -> None:
    adapter = load_adapter(tiny_adapter_dir)
    assert adapter.path == tiny_adapter_dir / NPZ_FILE
    assert adapter.config.variant == "TSW"
    assert all(v.dtype == np.float32 for v in adapter.tensors.values())
    assert len(adapter.tensors) == 2 * 9


def test_load_falls_back_to_the_pt(tmp_path: Path, tiny_adapter_dir: Path) -> None:
    adapter = load_adapter(pt_only(tiny_adapter_dir, tmp_path / "pt"))
    assert adapter.path.name == PT_FILE
    reference = load_adapter(tiny_adapter_dir).tensors
    assert sorted(adapter.tensors) == sorted(reference)
    for key, value in reference.items():
        np.testing.assert_array_equal(adapter.tensors[key], value)


@pytest.mark.parametrize("case", PARITY_CASES)
def test_reference_written_adapters_load_and_validate(case: str) -> None:
    adapter = load_adapter(PARITY / case / "adapter")
    expected = np.load(PARITY / case / "adapter_tensors.npz")
    assert sorted(adapter.tensors) == sorted(expected.files)
    for key in expected.files:
        np.testing.assert_array_equal(adapter.tensors[key], expected[key])
    validate_adapter(adapter, parity_dims(case))


@pytest.mark.parametrize("case", PARITY_CASES)
def test_expected_shapes_match_the_reference_files(case: str) -> None:
    adapter = load_adapter(PARITY / case / "adapter")
    shapes = expected_shapes(adapter.config, parity_dims(case))
    for layer in (0, 1):
        for name, shape in shapes.items():
            assert adapter.tensors[f"model.layers.{layer}.self_attn.{name}"].shape == shape, (case, name)


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_mlx_written_low_precision_npz_loads_as_float32(adapter_copy: Path, dtype: mx.Dtype) -> None:
    reference = load_adapter(adapter_copy).tensors
    low = {key: mx.array(value).astype(dtype) for key, value in reference.items()}
    (adapter_copy / NPZ_FILE).unlink()
    mx.savez(str(adapter_copy / NPZ_FILE), **low)

    adapter = load_adapter(adapter_copy)

    for key, value in low.items():
        assert adapter.tensors[key].dtype == np.float32
        np.testing.assert_array_equal(adapter.tensors[key], np.array(value.astype(mx.float32)))
    validate_adapter(adapter, TINY_DIMS)


def test_npz_with_pickled_objects_is_refused(adapter_copy: Path) -> None:
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with zipfile.ZipFile(adapter_copy / NPZ_FILE, "w") as archive:
        archive.writestr(f"{KEY}.npy", buffer.getvalue())
    with pytest.raises(AdapterError, match=NPZ_FILE):
        load_adapter(adapter_copy)


@pytest.mark.parametrize("content", [b"not a zip", b""])
def test_unreadable_npz_is_named(adapter_copy: Path, content: bytes) -> None:
    (adapter_copy / NPZ_FILE).write_bytes(content)
    with pytest.raises(AdapterError, match=f"{NPZ_FILE} is not a readable numpy archive"):
        load_adapter(adapter_copy)


def test_missing_config_is_named(adapter_copy: Path) -> None:
    (adapter_copy / CONFIG_FILE).unlink()
    with pytest.raises(AdapterError, match=f"{CONFIG_FILE} does not exist"):
        load_adapter(adapter_copy)


def test_invalid_config_json_is_named(adapter_copy: Path) -> None:
    (adapter_copy / CONFIG_FILE).write_text("{rank: 8")
    with pytest.raises(AdapterError, match="not valid JSON"):
        load_adapter(adapter_copy)
    (adapter_copy / CONFIG_FILE).write_text("[8]")
    with pytest.raises(AdapterError, match="JSON object"):
        load_adapter(adapter_copy)


def test_unsupported_config_is_a_config_error(adapter_copy: Path) -> None:
    raw = json.loads((adapter_copy / CONFIG_FILE).read_text())
    (adapter_copy / CONFIG_FILE).write_text(json.dumps({**raw, "state_update_mode": "sideways"}))
    with pytest.raises(AdapterConfigError, match="state_update_mode"):
        load_adapter(adapter_copy)


def test_missing_weights_name_both_files(adapter_copy: Path) -> None:
    (adapter_copy / NPZ_FILE).unlink()
    (adapter_copy / PT_FILE).unlink()
    with pytest.raises(AdapterError) as failure:
        load_adapter(adapter_copy)
    assert (
        NPZ_FILE in str(failure.value)
        and PT_FILE in str(failure.value)
        and str(adapter_copy) in str(failure.value)
    )


# --- converting -----------------------------------------------------------------------------------


def test_convert_writes_an_equal_npz(tmp_path: Path, tiny_adapter_dir: Path) -> None:
    adapter_dir = pt_only(tiny_adapter_dir, tmp_path / "pt")
    npz = convert_adapter(adapter_dir)
    assert npz == adapter_dir / NPZ_FILE
    with np.load(npz, allow_pickle=False) as converted:
        reference = load_adapter(tiny_adapter_dir).tensors
        assert sorted(converted.files) == sorted(reference)
        for key, value in reference.items():
            assert converted[key].dtype == np.float32
            np.testing.assert_array_equal(converted[key], value)
    assert load_adapter(adapter_dir).path == npz
    assert [p.name for p in adapter_dir.iterdir() if p.name.startswith(".")] == []  # no temp files left


@pytest.mark.parametrize("case", PARITY_CASES)
def test_convert_reference_adapters(tmp_path: Path, case: str) -> None:
    adapter_dir = Path(shutil.copytree(PARITY / case / "adapter", tmp_path / case))
    npz = convert_adapter(adapter_dir)
    expected = np.load(PARITY / case / "adapter_tensors.npz")
    with np.load(npz) as converted:
        for key in expected.files:
            np.testing.assert_array_equal(converted[key], expected[key])


def test_convert_without_pt_is_named(tmp_path: Path) -> None:
    with pytest.raises(AdapterError, match=f"{PT_FILE} does not exist"):
        convert_adapter(tmp_path)


def test_convert_refuses_a_malicious_pt(tmp_path: Path) -> None:
    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return os.system, (f"touch {tmp_path / 'pwned'}",)

    adapter_dir = tmp_path / "evil"
    adapter_dir.mkdir()
    with zipfile.ZipFile(adapter_dir / PT_FILE, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"w": Payload()}, protocol=2))
    with pytest.raises(UnsafeArchiveError, match="system"):
        convert_adapter(adapter_dir)
    assert not (tmp_path / "pwned").exists()
    assert not (adapter_dir / NPZ_FILE).exists()


def test_corrupt_pt_is_an_adapter_error(adapter_copy: Path) -> None:
    (adapter_copy / NPZ_FILE).unlink()
    data = (adapter_copy / PT_FILE).read_bytes()
    (adapter_copy / PT_FILE).write_bytes(data[: len(data) // 3])
    with pytest.raises(AdapterError, match="truncated"):
        load_adapter(adapter_copy)
    with pytest.raises(AdapterError, match="truncated"):
        convert_adapter(adapter_copy)


# --- model dims ----------------------------------------------------------------------------------


def test_model_dims_from_qwen3_and_qwen2_configs() -> None:
    qwen3 = {
        "hidden_size": 2560,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
    }
    assert model_dims(qwen3) == ModelDims(2560, 36, 32, 8, 128)
    qwen2 = {"hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2}
    assert model_dims(qwen2) == ModelDims(896, 24, 14, 2, 64)
    assert model_dims({"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}).num_kv_heads == 4


def test_model_dims_names_what_is_missing() -> None:
    with pytest.raises(AdapterError, match="num_hidden_layers"):
        model_dims({"hidden_size": 64, "num_attention_heads": 4})


def test_released_adapter_size() -> None:
    # DESIGN.md §2: 4.87 M trainable parameters = 36 × 135,176 for Qwen3-4B (inactive δk/δv excluded).
    config = DeltaMemConfig()
    shapes = expected_shapes(config, ModelDims(2560, 36, 32, 8, 128))
    active = [name for name in shapes if name not in ("delta_k_proj", "delta_v_proj")]
    assert sum(int(np.prod(shapes[name])) for name in active) == 135_176


# --- validation ----------------------------------------------------------------------------------


def changed(adapter: LoadedAdapter, **tensors: np.ndarray | None) -> LoadedAdapter:
    """A copy of `adapter` with tensors replaced (or removed when None), by full key."""
    updated = dict(adapter.tensors)
    for key, value in tensors.items():
        if value is None:
            del updated[key]
        else:
            updated[key] = value
    return replace(adapter, tensors=updated)


@pytest.fixture(scope="module")
def tiny_adapter(tiny_adapter_dir: Path) -> LoadedAdapter:
    return load_adapter(tiny_adapter_dir)


def test_valid_adapter_passes(tiny_adapter: LoadedAdapter) -> None:
    validate_adapter(tiny_adapter, TINY_DIMS)


def test_missing_tensor_names_file_key_and_shape(tiny_adapter: LoadedAdapter) -> None:
    with pytest.raises(AdapterError) as failure:
        validate_adapter(changed(tiny_adapter, **{KEY: None}), TINY_DIMS)
    message = str(failure.value)
    assert (
        str(tiny_adapter.path) in message and KEY in message and "missing" in message and "[8, 64]" in message
    )


def test_wrong_shape_names_file_key_and_both_shapes(tiny_adapter: LoadedAdapter) -> None:
    bad = changed(tiny_adapter, **{KEY: tiny_adapter.tensors[KEY].T.copy()})
    with pytest.raises(AdapterError) as failure:
        validate_adapter(bad, TINY_DIMS)
    message = str(failure.value)
    assert str(tiny_adapter.path) in message and KEY in message
    assert "has shape [64, 8], expected [8, 64]" in message


def test_adapter_for_another_model_is_named(tiny_adapter: LoadedAdapter) -> None:
    wider = replace(TINY_DIMS, hidden_size=128)
    with pytest.raises(AdapterError) as failure:
        validate_adapter(tiny_adapter, wider)
    message = str(failure.value)
    assert "memory_q_proj has shape [8, 64], expected [8, 128]" in message and "does not match" in message


@pytest.mark.parametrize("num_layers", [1, 36])
def test_layer_count_mismatch_is_named(tiny_adapter: LoadedAdapter, num_layers: int) -> None:
    with pytest.raises(AdapterError) as failure:
        validate_adapter(tiny_adapter, replace(TINY_DIMS, num_layers=num_layers))
    message = str(failure.value)
    assert str(tiny_adapter.path) in message
    assert f"model has {num_layers} layers" in message and "layers 0, 1" in message


def test_inactive_delta_heads_are_ignored(tiny_adapter: LoadedAdapter) -> None:
    without = {f"model.layers.{i}.self_attn.delta_{h}_proj": None for i in (0, 1) for h in ("k", "v")}
    validate_adapter(changed(tiny_adapter, **without), TINY_DIMS)
    misshapen = {"model.layers.0.self_attn.delta_k_proj": np.zeros((3, 3), dtype=np.float32)}
    validate_adapter(changed(tiny_adapter, **misshapen), TINY_DIMS)


def test_active_k_head_is_required(tiny_adapter: LoadedAdapter) -> None:
    with_k = replace(tiny_adapter, config=replace(tiny_adapter.config, delta_heads=("q", "k", "o")))
    validate_adapter(with_k, TINY_DIMS)
    with pytest.raises(AdapterError, match="delta_k_proj is missing"):
        validate_adapter(changed(with_k, **{"model.layers.0.self_attn.delta_k_proj": None}), TINY_DIMS)


def test_uncoupled_lambda_tensors_are_required(tmp_path: Path, tiny_model_dir: Path) -> None:
    adapter = load_adapter(write_tiny_adapter(tmp_path / "u", tiny_model_dir, couple_lambda=False))
    validate_adapter(adapter, TINY_DIMS)
    with pytest.raises(AdapterError, match="lambda_bias is missing"):
        validate_adapter(changed(adapter, **{"model.layers.1.self_attn.lambda_bias": None}), TINY_DIMS)


def test_msw_shapes_are_checked(tiny_msw_adapter_dir: Path) -> None:
    adapter = load_adapter(tiny_msw_adapter_dir)
    validate_adapter(adapter, TINY_DIMS)
    as_single_head = replace(adapter, config=replace(adapter.config, num_state_heads=1))
    with pytest.raises(AdapterError, match=r"memory_q_proj has shape \[32, 64\], expected \[8, 64\]"):
        validate_adapter(as_single_head, TINY_DIMS)


def test_target_layers_subset(tiny_adapter: LoadedAdapter) -> None:
    only_layer_1 = {
        key: value for key, value in tiny_adapter.tensors.items() if key.startswith("model.layers.1.")
    }
    adapter = replace(
        tiny_adapter, config=replace(tiny_adapter.config, target_layers=(1,)), tensors=only_layer_1
    )
    validate_adapter(adapter, TINY_DIMS)
    with pytest.raises(AdapterConfigError, match="target_layers"):
        validate_adapter(replace(adapter, config=replace(adapter.config, target_layers=(5,))), TINY_DIMS)


def test_non_finite_values_are_refused(tiny_adapter: LoadedAdapter) -> None:
    broken = tiny_adapter.tensors[KEY].copy()
    broken[0, 0] = np.nan
    with pytest.raises(AdapterError, match=f"{KEY} contains NaN"):
        validate_adapter(changed(tiny_adapter, **{KEY: broken}), TINY_DIMS)


def test_no_layer_keys_at_all_reports_the_first_missing_tensor(tiny_adapter: LoadedAdapter) -> None:
    with pytest.raises(AdapterError, match="model.layers.0.self_attn.memory_q_proj is missing"):
        validate_adapter(replace(tiny_adapter, tensors={"unrelated": np.zeros(1, np.float32)}), TINY_DIMS)


# --- CLI messages ---------------------------------------------------------------------------------


def test_errors_map_to_one_line_messages(tmp_path: Path) -> None:
    assert describe(AdapterError("x.npz: tensor k is missing")) == "adapter: x.npz: tensor k is missing"
    assert (
        describe(UnsafeArchiveError("a.pt refers to posix.system"))
        == "unsafe adapter file: a.pt refers to posix.system"
    )
    with pytest.raises(AdapterError) as failure:
        convert_adapter(tmp_path)
    message = describe(failure.value)
    assert message is not None and "\n" not in message
