"""The restricted torch `.pt` reader and its writer, without torch.

`tests/torch_fixtures/` holds files written once by real torch 2.13.0 (CPU):
`mixed_dtypes.pt` (bf16, fp16, f64, int64, bool, offset/strided views sharing a storage, a 0-d
tensor, an `nn.Parameter`), `linear_state_dict.pt` (an `nn.Linear` state dict: an OrderedDict
carrying `_metadata`) and `legacy_format.pt` (`_use_new_zipfile_serialization=False`). The
`*_expected.npz` files hold the same tensors converted by torch (`.float()` for floating types).
"""

from __future__ import annotations

import builtins
import io
import os
import pickle
import pickletools
import random
import sys
import types
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sidecar.delta.torch_archive import (
    TorchArchiveError,
    UnsafeArchiveError,
    bfloat16_bits_to_float32,
    read_torch_archive,
    write_torch_archive,
)

TESTS = Path(__file__).resolve().parent
PARITY = TESTS / "parity"
TORCH_FIXTURES = TESTS / "torch_fixtures"
PARITY_CASES = ["tsw_model", "ssw_model", "msw_model"]


# --- crafting archives the way torch lays them out, without torch --------------------------------


class _StorageRef:
    def __init__(self, storage_type: type, key: str, numel: int) -> None:
        self.storage_type, self.key, self.numel = storage_type, key, numel


class _Tensor:
    """Pickles as torch does: `_rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())`."""

    def __init__(
        self, storage: _StorageRef, offset: int, size: tuple, stride: tuple, hooks: Any = None
    ) -> None:
        self.args = (storage, offset, size, stride, False, OrderedDict() if hooks is None else hooks)

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return sys.modules["torch._utils"]._rebuild_tensor_v2, self.args


class _TorchPickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _StorageRef):
            return ("storage", obj.storage_type, obj.key, "cpu", obj.numel)
        return None


@pytest.fixture
def fake_torch(monkeypatch: pytest.MonkeyPatch) -> types.SimpleNamespace:
    """Stand-in `torch` modules so the stdlib pickler writes torch's global names."""
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args: Any) -> None:
        raise AssertionError("only pickled, never called")

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    storages = {}
    for name in ("FloatStorage", "BFloat16Storage", "HalfStorage"):
        storages[name] = type(name, (), {"__module__": "torch"})
        setattr(torch, name, storages[name])
    torch._utils = utils
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", utils)
    return types.SimpleNamespace(**storages)


def craft_archive(path: Path, obj: Any, storages: dict[str, bytes], *, protocol: int = 2) -> Path:
    """Write `obj` (pickled with torch's persistent ids) and raw storages as a torch zip archive."""
    buffer = io.BytesIO()
    _TorchPickler(buffer, protocol=protocol).dump(obj)
    records = {"archive/data.pkl": buffer.getvalue(), "archive/byteorder": b"little"}
    records |= {f"archive/data/{key}": data for key, data in storages.items()}
    return zip_records(path, records)


def zip_records(path: Path, records: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        for name, data in records.items():
            archive.writestr(name, data)
    return path


def read_records(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def float_tensor(
    fake_torch: types.SimpleNamespace, values: np.ndarray, key: str = "0"
) -> tuple[_Tensor, dict[str, bytes]]:
    values = np.ascontiguousarray(values, dtype="<f4")
    ref = _StorageRef(fake_torch.FloatStorage, key, values.size)
    strides = tuple(s // 4 for s in values.strides)
    return _Tensor(ref, 0, values.shape, strides), {key: values.tobytes()}


# --- reading real torch files ---------------------------------------------------------------------


@pytest.mark.parametrize("case", PARITY_CASES)
def test_parity_archives_read_equal_to_their_npz(case: str) -> None:
    tensors = read_torch_archive(PARITY / case / "adapter" / "delta_mem_adapter.pt")
    expected = np.load(PARITY / case / "adapter_tensors.npz")
    assert sorted(tensors) == sorted(expected.files)
    for key in expected.files:
        assert tensors[key].dtype == np.float32
        assert tensors[key].shape == expected[key].shape
        np.testing.assert_array_equal(tensors[key], expected[key], err_msg=key)


def test_torch_written_dtypes_views_and_parameters_read_exactly() -> None:
    tensors = read_torch_archive(TORCH_FIXTURES / "mixed_dtypes.pt")
    expected = np.load(TORCH_FIXTURES / "mixed_dtypes_expected.npz")
    assert sorted(tensors) == sorted(expected.files)
    for key in expected.files:
        assert tensors[key].shape == expected[key].shape, key
        np.testing.assert_array_equal(tensors[key], expected[key], err_msg=key)
    # bf16/fp16 widen to float32 exactly; other dtypes keep their type.
    assert {k: tensors[k].dtype for k in ("bf16", "fp16", "f64", "i64", "bool")} == {
        "bf16": np.float32,
        "fp16": np.float32,
        "f64": np.float64,
        "i64": np.int64,
        "bool": np.bool_,
    }
    # A view is its own copy, not an alias of the storage it shared with "base".
    np.testing.assert_array_equal(tensors["view_offset"], tensors["base"][2:5, 3:9])
    np.testing.assert_array_equal(tensors["view_T"], tensors["base"].T)
    assert tensors["scalar"].shape == () and float(tensors["scalar"]) == 2.5


def test_torch_state_dict_with_metadata_reads() -> None:
    tensors = read_torch_archive(TORCH_FIXTURES / "linear_state_dict.pt")
    expected = np.load(TORCH_FIXTURES / "linear_state_dict_expected.npz")
    assert sorted(tensors) == ["bias", "weight"]
    for key in expected.files:
        np.testing.assert_array_equal(tensors[key], expected[key])


def test_bfloat16_bits_widen_exactly() -> None:
    values = np.array([0.0, -0.0, 1.0, -2.5, 3.140625, np.inf, -np.inf, 2.0**-130], dtype=np.float32)
    bits = (values.view(np.uint32) >> 16).astype(np.uint16)
    np.testing.assert_array_equal(bfloat16_bits_to_float32(bits), values)
    assert np.isnan(bfloat16_bits_to_float32(np.array([0x7FC0], dtype=np.uint16)))[0]


def test_big_endian_archive_reads(tmp_path: Path) -> None:
    values = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    write_torch_archive(tmp_path / "le.pt", {"w": values})
    records = read_records(tmp_path / "le.pt")
    prefix = next(n for n in records if n.endswith("/data.pkl")).split("/")[0]
    records[f"{prefix}/byteorder"] = b"big"
    records[f"{prefix}/data/0"] = values.astype(">f4").tobytes()
    tensors = read_torch_archive(zip_records(tmp_path / "be.pt", records))
    np.testing.assert_array_equal(tensors["w"], values)
    assert tensors["w"].dtype == np.float32 and tensors["w"].dtype.isnative


# --- the writer --------------------------------------------------------------------------------


def test_writer_round_trips(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    tensors = {
        "model.layers.0.self_attn.memory_q_proj": rng.normal(size=(8, 64)).astype(np.float32),
        "three_d": rng.normal(size=(2, 3, 4)).astype(np.float32),
        "transposed": rng.normal(size=(5, 3)).astype(np.float32).T,
        "float64_input": rng.normal(size=(4,)),
        "scalar": np.float32(1.5),
        "empty": np.zeros((0, 3), dtype=np.float32),
        "ünïcode key": np.ones((1,), dtype=np.float32),
    }
    path = tmp_path / "round.pt"
    write_torch_archive(path, tensors)
    back = read_torch_archive(path)
    assert list(back) == list(tensors)
    for key, value in tensors.items():
        expected = np.asarray(value, dtype=np.float32)
        assert back[key].dtype == np.float32 and back[key].shape == expected.shape, key
        np.testing.assert_array_equal(back[key], expected)


def test_writer_uses_only_the_globals_torch_itself_writes(tmp_path: Path) -> None:
    write_torch_archive(tmp_path / "mine.pt", {"a": np.ones((2, 2), dtype=np.float32)})

    def globals_of(path: Path) -> set[str]:
        pkl = next(data for name, data in read_records(path).items() if name.endswith("/data.pkl"))
        return {str(arg) for op, arg, _ in pickletools.genops(pkl) if op.name == "GLOBAL"}

    torch_written = globals_of(PARITY / "tsw_model" / "adapter" / "delta_mem_adapter.pt")
    assert globals_of(tmp_path / "mine.pt") == torch_written
    records = read_records(tmp_path / "mine.pt")
    assert set(records) == {"mine/data.pkl", "mine/byteorder", "mine/data/0", "mine/version"}
    assert records["mine/byteorder"] == b"little"


def test_writer_is_deterministic(tmp_path: Path) -> None:
    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3)}
    write_torch_archive(tmp_path / "one.pt", tensors)
    write_torch_archive(tmp_path / "two" / "one.pt", tensors)
    assert (tmp_path / "one.pt").read_bytes() == (tmp_path / "two" / "one.pt").read_bytes()


# --- refusing malicious pickles -----------------------------------------------------------------


class _SystemCall:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str]]:
        return os.system, (self.command,)


class _Exec:
    def __init__(self, source: str) -> None:
        self.source = source

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str]]:
        return builtins.exec, (self.source,)


def _payloads(marker: Path) -> dict[str, Any]:
    return {
        "os.system": _SystemCall(f"touch {marker}"),
        "builtins.exec": _Exec(f"open({str(marker)!r}, 'w').write('pwned')"),
    }


@pytest.mark.parametrize("payload", ["os.system", "builtins.exec"])
@pytest.mark.parametrize("protocol", [2, 4])
def test_malicious_pickle_is_refused_before_it_runs(
    tmp_path: Path, fake_torch: types.SimpleNamespace, payload: str, protocol: int
) -> None:
    marker = tmp_path / "pwned"
    tensor, storages = float_tensor(fake_torch, np.ones((2, 2)))
    obj = {"model.layers.0.self_attn.beta_bias": tensor, "evil": _payloads(marker)[payload]}
    path = craft_archive(tmp_path / "evil.pt", obj, storages, protocol=protocol)

    with pytest.raises(UnsafeArchiveError) as refused:
        read_torch_archive(path)

    # Protocol 2 spells the builtins module the Python 2 way.
    named = {
        "os.system": [f"{os.system.__module__}.system"],
        "builtins.exec": ["builtins.exec", "__builtin__.exec"],
    }
    assert any(name in str(refused.value) for name in named[payload])
    assert str(path) in str(refused.value)
    assert not marker.exists()


def test_payload_hidden_in_tensor_arguments_is_refused(
    tmp_path: Path, fake_torch: types.SimpleNamespace
) -> None:
    marker = tmp_path / "pwned"
    ref = _StorageRef(fake_torch.FloatStorage, "0", 4)
    tensor = _Tensor(ref, 0, (2, 2), (2, 1), hooks=_SystemCall(f"touch {marker}"))
    path = craft_archive(tmp_path / "evil.pt", {"w": tensor}, {"0": np.ones(4, "<f4").tobytes()})
    with pytest.raises(UnsafeArchiveError):
        read_torch_archive(path)
    assert not marker.exists()


def test_crafted_archive_without_payload_reads(tmp_path: Path, fake_torch: types.SimpleNamespace) -> None:
    # The crafting helpers themselves produce readable archives, so the refusals above are real.
    values = np.arange(6, dtype=np.float32).reshape(2, 3)
    tensor, storages = float_tensor(fake_torch, values)
    tensors = read_torch_archive(craft_archive(tmp_path / "ok.pt", {"w": tensor}, storages))
    np.testing.assert_array_equal(tensors["w"], values)


# --- corrupt, truncated and hostile layouts -----------------------------------------------------


def _damaged(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "damaged.pt"
    path.write_bytes(data)
    return path


def test_truncated_archive_fails_cleanly(tmp_path: Path) -> None:
    data = (PARITY / "tsw_model" / "adapter" / "delta_mem_adapter.pt").read_bytes()
    with pytest.raises(TorchArchiveError, match="truncated"):
        read_torch_archive(_damaged(tmp_path, data[: len(data) // 2]))


def test_every_truncation_point_fails_cleanly(tmp_path: Path) -> None:
    data = (TORCH_FIXTURES / "mixed_dtypes.pt").read_bytes()
    for end in range(0, len(data), 13):
        with pytest.raises(TorchArchiveError):
            read_torch_archive(_damaged(tmp_path, data[:end]))


def test_random_corruption_fails_cleanly_or_reads(tmp_path: Path) -> None:
    data = (TORCH_FIXTURES / "mixed_dtypes.pt").read_bytes()
    records = read_records(TORCH_FIXTURES / "mixed_dtypes.pt")
    pkl_name = next(name for name in records if name.endswith("/data.pkl"))
    rng = random.Random(1234)
    for trial in range(300):
        # Half the trials flip bytes anywhere (mostly caught by CRCs), half rewrite the pickle
        # inside a valid zip so that the unpickler itself meets the damage.
        if trial % 2:
            damaged = bytearray(data)
            for _ in range(rng.randint(1, 4)):
                damaged[rng.randrange(len(damaged))] = rng.randrange(256)
            path = _damaged(tmp_path, bytes(damaged))
        else:
            pkl = bytearray(records[pkl_name])
            for _ in range(rng.randint(1, 3)):
                pkl[rng.randrange(len(pkl))] = rng.randrange(256)
            path = zip_records(tmp_path / "damaged.pt", {**records, pkl_name: bytes(pkl)})
        try:
            tensors = read_torch_archive(path)
        except TorchArchiveError:
            continue
        assert all(isinstance(v, np.ndarray) for v in tensors.values())


def test_legacy_format_is_named(tmp_path: Path) -> None:
    with pytest.raises(TorchArchiveError, match="legacy"):
        read_torch_archive(TORCH_FIXTURES / "legacy_format.pt")


def test_not_a_zip_is_named(tmp_path: Path) -> None:
    with pytest.raises(TorchArchiveError, match="not a torch archive"):
        read_torch_archive(_damaged(tmp_path, b"hello, I am text\n"))


def test_missing_file_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_torch_archive(tmp_path / "absent.pt")


def test_zip_without_data_pkl_is_refused(tmp_path: Path) -> None:
    path = zip_records(tmp_path / "other.pt", {"x/readme.txt": b"hi"})
    with pytest.raises(TorchArchiveError, match="not a torch archive"):
        read_torch_archive(path)


def test_missing_storage_is_named(tmp_path: Path) -> None:
    records = read_records(PARITY / "tsw_model" / "adapter" / "delta_mem_adapter.pt")
    del records["delta_mem_adapter/data/3"]
    with pytest.raises(TorchArchiveError, match="missing the record delta_mem_adapter/data/3"):
        read_torch_archive(zip_records(tmp_path / "gap.pt", records))


def test_compressed_records_are_refused(tmp_path: Path) -> None:
    records = read_records(PARITY / "tsw_model" / "adapter" / "delta_mem_adapter.pt")
    path = zip_records(tmp_path / "deflated.pt", records, compression=zipfile.ZIP_DEFLATED)
    with pytest.raises(TorchArchiveError, match="compressed"):
        read_torch_archive(path)


def test_huge_claimed_storage_fails_without_allocating(
    tmp_path: Path, fake_torch: types.SimpleNamespace
) -> None:
    ref = _StorageRef(fake_torch.FloatStorage, "0", 10**15)
    tensor = _Tensor(ref, 0, (10**15,), (1,))
    path = craft_archive(tmp_path / "huge.pt", {"w": tensor}, {"0": b"\0" * 16})
    with pytest.raises(TorchArchiveError, match="holds 16 bytes, expected 4000000000000000"):
        read_torch_archive(path)


@pytest.mark.parametrize(
    ("offset", "size", "stride"),
    [
        (0, (5,), (1,)),  # more elements than the storage holds
        (3, (2,), (1,)),  # runs past the end through its offset
        (0, (2, 2), (3, 1)),  # runs past the end through its stride
        (0, (10**6, 10**6), (0, 0)),  # a zero-stride broadcast "bomb"
        (-1, (2,), (1,)),  # negative offset
    ],
)
def test_tensor_views_outside_their_storage_are_refused(
    tmp_path: Path, fake_torch: types.SimpleNamespace, offset: int, size: tuple, stride: tuple
) -> None:
    ref = _StorageRef(fake_torch.FloatStorage, "0", 4)
    path = craft_archive(
        tmp_path / "view.pt", {"w": _Tensor(ref, offset, size, stride)}, {"0": np.ones(4, "<f4").tobytes()}
    )
    with pytest.raises(TorchArchiveError, match="corrupt"):
        read_torch_archive(path)


def test_huge_memo_index_is_refused_before_unpickling(tmp_path: Path) -> None:
    # PROTO 2, EMPTY_DICT, LONG_BINPUT 0xfffffff0, STOP: CPython's C unpickler would size its
    # memo table to match.
    pkl = b"\x80\x02}r\xf0\xff\xff\xff."
    path = zip_records(tmp_path / "memo.pt", {"a/data.pkl": pkl, "a/byteorder": b"little"})
    with pytest.raises(TorchArchiveError, match="memo index"):
        read_torch_archive(path)


@pytest.mark.parametrize(
    ("obj", "message"),
    [([1, 2], "holds a list"), ({"a": {"b": 1}}, "not a flat dict"), ({1: 2}, "not a flat dict")],
)
def test_non_tensor_dicts_are_refused(tmp_path: Path, obj: Any, message: str) -> None:
    path = zip_records(tmp_path / "odd.pt", {"a/data.pkl": pickle.dumps(obj, protocol=2)})
    with pytest.raises(TorchArchiveError, match=message):
        read_torch_archive(path)


def test_bare_tensor_is_refused(tmp_path: Path, fake_torch: types.SimpleNamespace) -> None:
    tensor, storages = float_tensor(fake_torch, np.ones(3))
    with pytest.raises(TorchArchiveError, match="not a dict of tensors"):
        read_torch_archive(craft_archive(tmp_path / "bare.pt", tensor, storages))


def test_bfloat16_and_half_storages_via_crafted_archive(
    tmp_path: Path, fake_torch: types.SimpleNamespace
) -> None:
    values = np.array([1.0, -2.0, 0.5, 3.0], dtype=np.float32)
    bf16 = (values.view(np.uint32) >> 16).astype("<u2").tobytes()
    obj = {
        "bf": _Tensor(_StorageRef(fake_torch.BFloat16Storage, "0", 4), 1, (3,), (1,)),
        "half": _Tensor(_StorageRef(fake_torch.HalfStorage, "1", 4), 0, (2, 2), (1, 2)),
    }
    storages = {"0": bf16, "1": values.astype("<f2").tobytes()}
    tensors = read_torch_archive(craft_archive(tmp_path / "mixed.pt", obj, storages))
    np.testing.assert_array_equal(tensors["bf"], values[1:])
    np.testing.assert_array_equal(tensors["half"], values.reshape(2, 2).T)
    assert tensors["bf"].dtype == tensors["half"].dtype == np.float32
