"""The install receipt: written last and atomically; its presence means the install completed.

It records versions, the preset and model, the paths the sidecar uses, the supervisor kind, and
every file the sidecar loads with its size and sha256, so a later start can tell a damaged or
changed install from a good one. Importable without MLX (the plugin's status tool reads it).
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from common.errors import UserError
from common.files import atomic_write_json, read_regular_file
from common.layout import RootLayout
from common.settings import SettingsError, load_settings

RECEIPT_VERSION = 1
# A receipt lists a few dozen files; anything far bigger is not one.
MAX_RECEIPT_BYTES = 16 * 1024**2
_PACKAGES = ("openclaw-delta-mem-mlx", "mlx", "mlx-lm", "huggingface-hub")


class ReceiptError(UserError, ValueError):
    """A receipt file that exists but cannot be read."""


class NotInstalledError(UserError, RuntimeError):
    """The root has no completed, intact install; the message lists what is wrong."""

    topic = "cannot start"

    def __init__(self, problems: list[str]) -> None:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        super().__init__(problems[0] + more)
        self.problems = problems


@dataclass(frozen=True)
class ReceiptFile:
    """One installed file: absolute path, size in bytes, sha256."""

    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Receipt:
    """What an install put where, and with which versions."""

    installed_at: str
    preset: str
    model_id: str
    model_source: str
    adapter_source: str | None
    root: str
    model_path: str
    adapter_path: str | None
    settings_path: str
    supervisor: str
    versions: dict[str, str]
    files: tuple[ReceiptFile, ...]
    version: int = RECEIPT_VERSION

    def to_dict(self) -> dict[str, Any]:
        """The JSON form written to `receipt.json`."""
        data = asdict(self)
        data["files"] = [asdict(f) for f in self.files]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Receipt:
        """Parse the JSON form; raises ReceiptError on a missing or mistyped field."""
        try:
            files = tuple(ReceiptFile(**entry) for entry in data["files"])
            fields = {k: v for k, v in data.items() if k != "files"}
            receipt = cls(**fields, files=files)
        except (KeyError, TypeError) as exc:
            raise ReceiptError(f"missing or unexpected field: {exc}") from exc
        if receipt.version != RECEIPT_VERSION:
            raise ReceiptError(f"receipt version {receipt.version} is not {RECEIPT_VERSION}")
        return receipt


def installed_versions() -> dict[str, str]:
    """Versions of Python, the platform and the packages the sidecar depends on."""
    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for package in _PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    versions["executable"] = sys.executable
    return versions


def describe_files(paths: list[Path]) -> tuple[ReceiptFile, ...]:
    """Size and sha256 of each file, for a receipt."""
    return tuple(
        ReceiptFile(str(Path(p).absolute()), Path(p).stat().st_size, _sha256(Path(p))) for p in paths
    )


def new_receipt(
    root: Path,
    *,
    preset: str,
    model_id: str,
    model_source: str,
    adapter_source: str | None,
    model_path: Path,
    adapter_path: Path | None,
    supervisor: str,
    files: list[Path],
) -> Receipt:
    """A receipt for the files just installed, stamped now (hashes every file)."""
    layout = RootLayout.of(root)
    return Receipt(
        installed_at=datetime.now(UTC).isoformat(timespec="seconds"),
        preset=preset,
        model_id=model_id,
        model_source=model_source,
        adapter_source=adapter_source,
        root=str(layout.root),
        model_path=str(model_path),
        adapter_path=str(adapter_path) if adapter_path else None,
        settings_path=str(layout.settings),
        supervisor=supervisor,
        versions=installed_versions(),
        files=describe_files(files),
    )


def write_receipt(root: Path, receipt: Receipt) -> Path:
    """Atomically write the receipt; call this last, once everything it describes is in place."""
    path = RootLayout.of(root).receipt
    atomic_write_json(path, receipt.to_dict())
    return path


def remove_receipt(root: Path) -> None:
    """Mark the root as not (or no longer) completely installed."""
    RootLayout.of(root).receipt.unlink(missing_ok=True)


def read_receipt(root: Path) -> Receipt | None:
    """The root's receipt, or None when there is none or it cannot be read (verify_receipt says why)."""
    try:
        return load_receipt(root)
    except ReceiptError:
        return None


def load_receipt(root: Path) -> Receipt | None:
    """The root's receipt, or None when there is none; raises ReceiptError when it is unreadable."""
    path = RootLayout.of(root).receipt
    try:
        data = json.loads(read_regular_file(path, MAX_RECEIPT_BYTES).decode("utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReceiptError(f"{path} cannot be read: {exc}") from exc
    if not isinstance(data, dict):
        raise ReceiptError(f"{path} must hold a JSON object")
    try:
        return Receipt.from_dict(data)
    except ReceiptError as exc:
        raise ReceiptError(f"{path}: {exc}") from exc


def verify_receipt(root: Path, *, hashes: bool = True) -> list[str]:
    """Problems with the install at `root` (empty when it is complete and intact).

    Checks that the receipt exists and parses, that every recorded file is present with its size
    (and sha256 unless `hashes` is False), and that the settings file loads and still points at
    the installed model and adapter.
    """
    layout = RootLayout.of(root)
    reinstall = f"run 'delta-mem-mlx install-sidecar --root {layout.root}'"
    try:
        receipt = load_receipt(layout.root)
    except ReceiptError as exc:
        return [f"{exc}: {reinstall} again"]
    if receipt is None:
        return [f"{layout.root} has no completed install (no {layout.receipt.name}): {reinstall}"]
    problems = [_file_problem(entry, hashes) for entry in receipt.files]
    found = [p for p in problems if p is not None]
    try:
        settings = load_settings(layout.root)
    except SettingsError as exc:
        found.append(str(exc))
    else:
        if settings.model_path != receipt.model_path or settings.adapter_path != receipt.adapter_path:
            found.append(
                f"{layout.settings} points at a different model or adapter than the receipt: {reinstall}"
            )
    return found


def require_installed(root: Path, *, hashes: bool = True) -> None:
    """Raise NotInstalledError listing the problems when the root is not completely installed."""
    problems = verify_receipt(root, hashes=hashes)
    if problems:
        raise NotInstalledError(problems)


def _file_problem(entry: ReceiptFile, hashes: bool) -> str | None:
    path = Path(entry.path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return f"{path} is missing"
    if size != entry.size:
        return f"{path} has {size} bytes, the install wrote {entry.size}"
    if hashes and _sha256(path) != entry.sha256:
        return f"{path} has changed since the install (sha256 differs)"
    return None


def _sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()
