"""Read and write torch `.pt` tensor archives without torch and without unrestricted unpickling.

A torch zip archive holds `<prefix>/data.pkl` (a pickle naming tensor-rebuild functions and
persistent storage ids), the raw storages as `<prefix>/data/<key>` and a `<prefix>/byteorder`
record. The reader's unpickler resolves only the handful of globals a dict of tensors needs and
refuses everything else before it can run, so a malicious file cannot execute code.
"""

from __future__ import annotations

import io
import math
import pickle
import pickletools
import struct
import warnings
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import UserError
from common.files import atomic_write_bytes


class TorchArchiveError(UserError, ValueError):
    """A `.pt` file that is not a readable torch tensor archive."""

    topic = "torch file"


class UnsafeArchiveError(TorchArchiveError):
    """A `.pt` file whose pickle names a global outside the tensor-rebuild allow-list."""

    topic = "unsafe adapter file"


@dataclass(frozen=True)
class _StorageType:
    name: str


# Storage class name → element type (byte order applied from the archive's `byteorder` record).
# BFloat16 has no numpy type: its raw 16-bit patterns are widened to float32 after reading.
_STORAGE_DTYPES: dict[str, str] = {
    "DoubleStorage": "f8",
    "FloatStorage": "f4",
    "HalfStorage": "f2",
    "BFloat16Storage": "u2",
    "LongStorage": "i8",
    "IntStorage": "i4",
    "ShortStorage": "i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
}

_MAX_PICKLE_BYTES = 64 * 1024 * 1024


def bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """Widen raw bfloat16 bit patterns (uint16) to float32, exactly."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def read_torch_archive(path: Path) -> dict[str, np.ndarray]:
    """Read a `torch.save`d dict of tensors; float16/bfloat16 come back as float32."""
    path = Path(path)
    with open(path, "rb") as handle:
        try:
            if not zipfile.is_zipfile(handle):
                handle.seek(0)
                raise TorchArchiveError(_not_zip_message(path, handle.read(4)))
            with zipfile.ZipFile(handle) as archive:
                return _ArchiveReader(path, archive).read()
        except TorchArchiveError:
            raise
        # A damaged archive fails in many ways (bad offsets, bad pickle opcodes, wrong argument
        # types); each becomes one clear error instead of a crash.
        except (
            zipfile.BadZipFile,
            EOFError,
            OSError,
            pickle.UnpicklingError,
            struct.error,
            TypeError,
            ValueError,
            AttributeError,
            LookupError,
            OverflowError,
            RuntimeError,  # zipfile's NotImplementedError for odd flags, "encrypted" errors
        ) as exc:
            reason = str(exc) or type(exc).__name__
            raise TorchArchiveError(f"{path} is corrupt or truncated ({reason}); download it again") from exc


def write_torch_archive(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """Write float32 tensors as a torch zip archive that `torch.load(weights_only=True)` reads."""
    prefix = Path(path).stem or "archive"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        storages: list[bytes] = []
        pickled = _tensor_dict_pickle(tensors, storages)
        _write_record(archive, f"{prefix}/data.pkl", pickled)
        _write_record(archive, f"{prefix}/byteorder", b"little")
        for key, data in enumerate(storages):
            _write_record(archive, f"{prefix}/data/{key}", data)
        _write_record(archive, f"{prefix}/version", b"3\n")
    atomic_write_bytes(Path(path), buffer.getvalue())


def _not_zip_message(path: Path, head: bytes) -> str:
    if head.startswith(b"PK"):
        return f"{path} is truncated or corrupt (its zip directory is missing): download it again"
    if head[:1] == b"\x80":
        return (
            f"{path} uses torch's legacy (pre-1.6) format, which is not supported: "
            "re-save it with a current torch, or use the adapter's .npz"
        )
    return f"{path} is not a torch archive (not a zip file)"


class _ArchiveReader:
    def __init__(self, path: Path, archive: zipfile.ZipFile) -> None:
        self.path = path
        self.archive = archive
        self.size_on_disk = path.stat().st_size
        self.prefix = self._find_prefix()
        self.byteorder = self._byteorder()
        self.storages: dict[str, np.ndarray] = {}

    def read(self) -> dict[str, np.ndarray]:
        data = self._record(f"{self.prefix}/data.pkl", _MAX_PICKLE_BYTES)
        self._check_opcodes(data)
        result = _RestrictedUnpickler(io.BytesIO(data), self).load()
        if not isinstance(result, dict):
            raise TorchArchiveError(f"{self.path} holds a {type(result).__name__}, not a dict of tensors")
        for key, value in result.items():
            if not isinstance(key, str) or not isinstance(value, np.ndarray):
                raise TorchArchiveError(
                    f"{self.path} is not a flat dict of tensors (entry {key!r} is a {type(value).__name__})"
                )
        return dict(result)

    def _check_opcodes(self, data: bytes) -> None:
        # CPython's C unpickler sizes its memo table by the largest PUT index, so a 10-byte
        # pickle could demand gigabytes; buffer opcodes (protocol 5) never occur in torch files.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # odd escapes in damaged strings
            for opcode, arg, _ in pickletools.genops(data):
                if opcode.proto > 4:
                    raise TorchArchiveError(
                        f"{self.path} uses pickle opcode {opcode.name}, which torch never writes"
                    )
                if opcode.name in ("PUT", "BINPUT", "LONG_BINPUT") and int(arg) > len(data):
                    raise TorchArchiveError(f"{self.path} has a malformed pickle (memo index {arg})")

    def storage(self, pid: Any) -> np.ndarray:
        """Resolve a persistent id `('storage', type, key, location, numel)` to its elements."""
        if not (
            isinstance(pid, tuple)
            and len(pid) == 5
            and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)
            and isinstance(pid[2], str)
            and isinstance(pid[4], int)
            and pid[4] >= 0
        ):
            raise TorchArchiveError(f"{self.path} has a malformed storage reference {pid!r}")
        _, storage_type, key, _location, numel = pid
        if key not in self.storages:
            dtype = np.dtype(_STORAGE_DTYPES[storage_type.name]).newbyteorder(self.byteorder)
            expected = numel * dtype.itemsize
            raw = self._record(f"{self.prefix}/data/{key}", expected, exact=True)
            elements = np.frombuffer(raw, dtype=dtype)
            if storage_type.name == "BFloat16Storage":
                elements = bfloat16_bits_to_float32(elements)
            elif storage_type.name == "HalfStorage":
                elements = elements.astype(np.float32)
            self.storages[key] = elements.astype(elements.dtype.newbyteorder("="), copy=False)
        return self.storages[key]

    def _find_prefix(self) -> str:
        prefixes = [
            name[: -len("/data.pkl")]
            for name in self.archive.namelist()
            if name.endswith("/data.pkl") and name.count("/") == 1
        ]
        if len(prefixes) != 1:
            raise TorchArchiveError(
                f"{self.path} is a zip but not a torch archive (found {len(prefixes)} data.pkl records)"
            )
        return prefixes[0]

    def _byteorder(self) -> str:
        name = f"{self.prefix}/byteorder"
        if name not in self.archive.namelist():
            return "<"  # archives written before the record existed are little-endian
        order = self._record(name, 16).decode("ascii", "replace").strip()
        if order not in ("little", "big"):
            raise TorchArchiveError(f"{self.path} has an unknown byte order {order!r}")
        return "<" if order == "little" else ">"

    def _record(self, name: str, limit: int, exact: bool = False) -> bytes:
        try:
            info = self.archive.getinfo(name)
        except KeyError:
            raise TorchArchiveError(f"{self.path} is missing the record {name}") from None
        # torch stores records uncompressed, so a claimed size beyond the file itself is a lie;
        # checking before reading keeps a hostile header from causing a big allocation.
        if info.compress_type != zipfile.ZIP_STORED:
            raise TorchArchiveError(f"{self.path}: record {name} is compressed; torch never does that")
        if info.file_size > self.size_on_disk:
            raise TorchArchiveError(f"{self.path} is truncated: record {name} claims {info.file_size} bytes")
        if exact and info.file_size != limit:
            raise TorchArchiveError(
                f"{self.path}: storage {name} holds {info.file_size} bytes, expected {limit}"
            )
        if info.file_size > limit:
            raise TorchArchiveError(f"{self.path}: record {name} is too large ({info.file_size} bytes)")
        return self.archive.read(name)


def _rebuild_tensor(
    storage: np.ndarray,
    storage_offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    requires_grad: bool = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> np.ndarray:
    """Stand-in for `torch._utils._rebuild_tensor_v2`: a copy of the strided view of a storage."""
    if not isinstance(storage, np.ndarray):
        raise ValueError("a tensor refers to something that is not a storage")
    if backward_hooks:
        raise ValueError("a tensor carries backward hooks, which a tensor archive never needs")
    size, stride = tuple(size), tuple(stride)
    dims_ok = all(isinstance(v, int) and v >= 0 for v in (storage_offset, *size, *stride))
    if not dims_ok or len(size) != len(stride):
        raise ValueError(f"a tensor has an invalid layout (size {size}, stride {stride})")
    numel = math.prod(size)
    if numel == 0:
        return np.empty(size, dtype=storage.dtype)
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    # More elements than the storage holds can only come from zero strides: refuse rather than
    # materialise a broadcast that a hostile file could make arbitrarily large.
    if last >= storage.size or numel > storage.size:
        raise ValueError(
            f"a tensor of size {size} (stride {stride}, offset {storage_offset}) does not fit its "
            f"storage of {storage.size} elements"
        )
    view = np.lib.stride_tricks.as_strided(
        storage[storage_offset:],
        shape=size,
        strides=tuple(s * storage.itemsize for s in stride),
        writeable=False,
    )
    return np.array(view)


def _rebuild_parameter(
    data: np.ndarray, requires_grad: bool = False, backward_hooks: Any = None
) -> np.ndarray:
    """Stand-in for `torch._utils._rebuild_parameter`: a parameter is just its tensor here."""
    if backward_hooks:
        raise ValueError("a parameter carries backward hooks, which a tensor archive never needs")
    return data


def _allowed_global(module: str, name: str) -> Any:
    """A fresh stand-in for an allow-listed global, or None.

    Fresh on every lookup, so whatever a pickle does to the object (BUILD can set attributes)
    ends with that one load.
    """
    if module == "torch" and name in _STORAGE_DTYPES:
        return _StorageType(name)
    if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
        return lambda *args: _rebuild_tensor(*args)
    if (module, name) == ("torch._utils", "_rebuild_parameter"):
        return lambda *args: _rebuild_parameter(*args)
    if (module, name) == ("collections", "OrderedDict"):
        return OrderedDict  # a built-in type: immutable
    return None


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, reader: _ArchiveReader) -> None:
        super().__init__(file)
        self.reader = reader

    def find_class(self, module: str, name: str) -> Any:
        found = _allowed_global(module, name)
        if found is None:
            raise UnsafeArchiveError(
                f"{self.reader.path} refers to {module}.{name}, which a tensor archive never needs; "
                "refusing to load it (the file may be malicious): get the adapter from a trusted source"
            )
        return found

    def persistent_load(self, pid: Any) -> np.ndarray:
        return self.reader.storage(pid)


def _tensor_dict_pickle(tensors: dict[str, np.ndarray], storages: list[bytes]) -> bytes:
    """Protocol-2 pickle of `{name: tensor}` in torch's layout; appends each tensor's bytes to `storages`."""
    out = bytearray(b"\x80\x02}(")  # PROTO 2, EMPTY_DICT, MARK
    for name, value in tensors.items():
        array = np.array(value, dtype="<f4", order="C")  # ascontiguousarray would make 0-d 1-d
        key = str(len(storages))
        storages.append(array.tobytes())
        out += _unicode(name)
        out += b"ctorch._utils\n_rebuild_tensor_v2\n("
        out += b"(" + _unicode("storage") + b"ctorch\nFloatStorage\n"
        out += _unicode(key) + _unicode("cpu") + _int(array.size) + b"tQ"  # TUPLE, BINPERSID
        out += _int(0)
        out += _int_tuple(array.shape)
        out += _int_tuple(tuple(s // array.itemsize for s in array.strides))
        out += b"\x89ccollections\nOrderedDict\n)R"  # requires_grad=False, OrderedDict()
        out += b"tR"  # args TUPLE, REDUCE
    out += b"u."  # SETITEMS, STOP
    return bytes(out)


def _unicode(text: str) -> bytes:
    data = text.encode("utf-8")
    return b"X" + struct.pack("<I", len(data)) + data


def _int(value: int) -> bytes:
    data = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(data)]) + data  # LONG1


def _int_tuple(values: tuple[int, ...]) -> bytes:
    return b"(" + b"".join(_int(v) for v in values) + b"t"


def _write_record(archive: zipfile.ZipFile, name: str, data: bytes) -> None:
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    archive.writestr(info, data)
