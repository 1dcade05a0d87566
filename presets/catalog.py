"""Install presets (`presets/*.yaml`): what to fetch and how to serve it, validated on load."""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from common.durations import DurationError, parse_duration
from common.errors import UserError
from common.kv_budget import GIB, KV_BITS, KvShape

# OpenClaw refuses a provider model with a smaller context window (DESIGN.md §6).
MIN_CONTEXT_WINDOW = 16000

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")
_PRESET_KEYS = {
    "name",
    "description",
    "model",
    "model_id",
    "min_memory_gb",
    "context_window",
    "max_output_tokens",
    "max_context_window",
    "kv_bits_by_ram",
    "kv_shape",
    "adapter",
    "keep_alive",
}
_SHAPE_KEYS = {"layers", "kv_heads", "head_dim", "dtype_bytes", "delta_layers", "delta_state_floats", "weights_bytes"}
_MODEL_KEYS = {"repo", "path", "revision", "files"}
_ADAPTER_KEYS = {"repo", "path", "revision", "alternatives"}


class PresetError(UserError, ValueError):
    """A preset file or a preset override that cannot be used, with the reason."""

    topic = "preset"


@dataclass(frozen=True)
class Source:
    """Where files come from: a Hub repo at a revision, or a local directory."""

    repo: str | None = None
    path: Path | None = None
    revision: str = "main"

    @property
    def is_set(self) -> bool:
        """True when a repo or a directory was given."""
        return self.repo is not None or self.path is not None

    def describe(self) -> str:
        """`owner/name@revision` or the local directory."""
        if self.path is not None:
            return str(self.path)
        if self.repo is not None:
            return f"{self.repo}@{self.revision}"
        return "(not set)"


@dataclass(frozen=True)
class Preset:
    """One install recipe: model, served id, memory floor, serving limits, optional adapter."""

    name: str
    description: str
    model: Source
    model_files: tuple[str, ...]
    model_id: str | None
    min_memory_gb: float
    context_window: int
    max_output_tokens: int
    adapter: Source | None
    adapter_alternatives: tuple[str, ...] = ()
    max_context_window: int | None = None  # announced when the KV budget holds a full window of it
    kv_bits_by_ram: tuple[tuple[float, int | None], ...] = ()  # (from this many GB of RAM, KV bits)
    kv_shape: KvShape | None = None  # to plan memory before the model is downloaded
    weights_bytes: int | None = None
    keep_alive_s: float = 0.0  # the sidecar unloads the model after this long idle; 0: never

    def kv_bits_for(self, ram_bytes: int) -> int | None:
        """The preset's KV precision for a machine with this much RAM (None: float K/V)."""
        bits = None
        for from_gb, choice in self.kv_bits_by_ram:
            if ram_bytes + GIB // 2 >= from_gb * GIB:  # "16 GB" Macs report a little under 16 GiB
                bits = choice
        return bits

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly summary for `presets --json`."""
        return {
            "name": self.name,
            "description": self.description,
            "model": self.model.describe() if self.model.is_set else None,
            "model_id": self.model_id,
            "min_memory_gb": self.min_memory_gb,
            "context_window": self.context_window,
            "max_output_tokens": self.max_output_tokens,
            "adapter": self.adapter.describe() if self.adapter else None,
            "adapter_alternatives": list(self.adapter_alternatives),
            "max_context_window": self.max_context_window,
            "kv_bits_by_ram": [[gb, bits] for gb, bits in self.kv_bits_by_ram],
            "keep_alive_s": self.keep_alive_s,
        }

    def check_complete(self) -> None:
        """Raise PresetError when something an install needs is still missing."""
        if not self.model.is_set:
            raise PresetError(
                f"preset {self.name!r} names no model: pass --model-repo ID or --model-path DIR"
            )
        if not self.model_id:
            raise PresetError(f"preset {self.name!r} names no model id: pass --model-id ID")


def preset_names() -> list[str]:
    """Names of the presets shipped in the `presets` package, sorted."""
    return sorted(
        entry.name.removesuffix(".yaml")
        for entry in resources.files("presets").iterdir()
        if entry.name.endswith(".yaml")
    )


def load_preset(name: str) -> Preset:
    """Load and validate a shipped preset by name."""
    names = preset_names()
    if name not in names:
        raise PresetError(f"unknown preset {name!r}: choose one of {', '.join(names)}")
    text = resources.files("presets").joinpath(f"{name}.yaml").read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PresetError(f"presets/{name}.yaml is not valid YAML: {exc}") from exc
    preset = parse_preset(data, origin=f"presets/{name}.yaml")
    if preset.name != name:
        raise PresetError(f"presets/{name}.yaml declares name {preset.name!r}; they must match")
    return preset


def list_presets() -> list[Preset]:
    """Every shipped preset, validated."""
    return [load_preset(name) for name in preset_names()]


def parse_preset(data: Any, origin: str) -> Preset:
    """Validate a preset mapping read from YAML; errors name the file and the key."""
    where = origin
    top = _mapping(data, where, _PRESET_KEYS, required={"name", "model", "model_id", "min_memory_gb"})
    model_data = _mapping(top["model"], f"{where}: model", _MODEL_KEYS, required={"files"})
    files = model_data["files"]
    if not isinstance(files, list) or not files or not all(isinstance(f, str) and f for f in files):
        raise PresetError(f"{where}: model.files must be a non-empty list of file patterns")
    model = _source(model_data, f"{where}: model")
    adapter_data = top.get("adapter")
    adapter: Source | None = None
    alternatives: tuple[str, ...] = ()
    if adapter_data is not None:
        adapter_map = _mapping(adapter_data, f"{where}: adapter", _ADAPTER_KEYS, required=set())
        adapter = _source(adapter_map, f"{where}: adapter")
        if not adapter.is_set:
            raise PresetError(f"{where}: adapter needs a repo or a path (or write `adapter: null`)")
        alternatives = tuple(
            _repo_id(r, f"{where}: adapter.alternatives") for r in adapter_map.get("alternatives") or []
        )
    preset = Preset(
        name=_string(top["name"], f"{where}: name"),
        description=_string(top.get("description", ""), f"{where}: description", allow_empty=True),
        model=model,
        model_files=tuple(files),
        model_id=_model_id(top["model_id"], f"{where}: model_id") if top["model_id"] is not None else None,
        min_memory_gb=_positive_number(top["min_memory_gb"], f"{where}: min_memory_gb"),
        context_window=_context_window(top.get("context_window", 32768), f"{where}: context_window"),
        max_output_tokens=_positive_int(top.get("max_output_tokens", 4096), f"{where}: max_output_tokens"),
        adapter=adapter,
        adapter_alternatives=alternatives,
        max_context_window=_max_window(top.get("max_context_window"), f"{where}: max_context_window"),
        kv_bits_by_ram=_kv_bits_by_ram(top.get("kv_bits_by_ram", {}), f"{where}: kv_bits_by_ram"),
        keep_alive_s=_keep_alive(top.get("keep_alive", 0), f"{where}: keep_alive"),
        **_kv_shape(top.get("kv_shape"), f"{where}: kv_shape"),
    )
    if preset.max_output_tokens >= preset.context_window:
        raise PresetError(f"{where}: max_output_tokens must be smaller than context_window")
    if preset.max_context_window is not None and preset.max_context_window < preset.context_window:
        raise PresetError(f"{where}: max_context_window must be at least context_window")
    return preset


def with_overrides(
    preset: Preset,
    *,
    model_repo: str | None = None,
    model_path: Path | None = None,
    adapter_repo: str | None = None,
    adapter_path: Path | None = None,
    model_id: str | None = None,
    min_memory_gb: float | None = None,
) -> Preset:
    """The preset with command-line choices applied; checks them and that the result is complete."""
    if model_repo is not None and model_path is not None:
        raise PresetError("pass --model-repo or --model-path, not both")
    if adapter_repo is not None and adapter_path is not None:
        raise PresetError("pass --adapter-repo or --adapter-path, not both")
    changes: dict[str, Any] = {}
    if model_repo is not None:
        changes["model"] = Source(repo=_repo_id(model_repo, "--model-repo"))
    elif model_path is not None:
        changes["model"] = Source(path=_existing_dir(model_path, "--model-path"))
    if adapter_repo is not None:
        changes["adapter"] = Source(repo=_repo_id(adapter_repo, "--adapter-repo"))
    elif adapter_path is not None:
        changes["adapter"] = Source(path=_existing_dir(adapter_path, "--adapter-path"))
    if model_id is not None:
        changes["model_id"] = _model_id(model_id, "--model-id")
    if min_memory_gb is not None:
        changes["min_memory_gb"] = _positive_number(min_memory_gb, "--min-memory-gb")
    result = dataclasses.replace(preset, **changes)
    result.check_complete()
    return result


def _mapping(value: Any, where: str, allowed: set[str], required: set[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise PresetError(f"{where} must be a mapping")
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise PresetError(f"{where}: unknown key(s) {', '.join(unknown)}")
    missing = sorted(required - set(value))
    if missing:
        raise PresetError(f"{where}: missing key(s) {', '.join(missing)}")
    return value


def _source(data: dict[str, Any], where: str) -> Source:
    repo, path = data.get("repo"), data.get("path")
    if repo is not None and path is not None:
        raise PresetError(f"{where}: give a repo or a path, not both")
    revision = _string(data.get("revision", "main"), f"{where}.revision")
    return Source(
        repo=_repo_id(repo, f"{where}.repo") if repo is not None else None,
        path=Path(_string(path, f"{where}.path")).expanduser() if path is not None else None,
        revision=revision,
    )


def _string(value: Any, where: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str) or (not value and not allow_empty):
        raise PresetError(f"{where} must be a non-empty string")
    return value


def _repo_id(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _REPO_ID.match(value) or ".." in value:
        raise PresetError(f"{where}: {value!r} is not a Hugging Face repo id like owner/name")
    return value


def _model_id(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _MODEL_ID.match(value):
        raise PresetError(
            f"{where}: {value!r} is not a usable model id (letters, digits, '.', '_', ':', '-')"
        )
    return value


def _positive_number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise PresetError(f"{where} must be a positive number (got {value!r})")
    return float(value)


def _positive_int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise PresetError(f"{where} must be a positive integer (got {value!r})")
    return value


def _context_window(value: Any, where: str) -> int:
    window = _positive_int(value, where)
    if window < MIN_CONTEXT_WINDOW:
        raise PresetError(f"{where} is {window}: OpenClaw refuses models under {MIN_CONTEXT_WINDOW} tokens")
    return window


def _keep_alive(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise PresetError(f"{where} must be a duration such as 5m, 300 or never")
    try:
        return parse_duration(str(value))
    except DurationError as exc:
        raise PresetError(f"{where}: {exc}") from None


def _max_window(value: Any, where: str) -> int | None:
    return None if value is None else _context_window(value, where)


def _kv_bits_by_ram(value: Any, where: str) -> tuple[tuple[float, int | None], ...]:
    if not isinstance(value, dict):
        raise PresetError(f"{where} must map GB of RAM to KV bits (8, 4 or null)")
    rows = []
    for from_gb, bits in value.items():
        if isinstance(from_gb, bool) or not isinstance(from_gb, (int, float)) or from_gb < 0:
            raise PresetError(f"{where}: {from_gb!r} is not an amount of RAM in GB")
        if bits is not None and bits not in KV_BITS:
            raise PresetError(f"{where}: {bits!r} is not 8, 4 or null")
        rows.append((float(from_gb), bits))
    return tuple(sorted(rows))


def _kv_shape(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    data = _mapping(value, where, _SHAPE_KEYS, required=_SHAPE_KEYS - {"delta_layers", "delta_state_floats"})
    numbers = {key: _positive_int(data[key], f"{where}.{key}") for key in data}
    weights = numbers.pop("weights_bytes")
    return {"kv_shape": KvShape(**numbers), "weights_bytes": weights}


def _existing_dir(path: Path, where: str) -> Path:
    # realpath, not Path.resolve: Python 3.11 raises RuntimeError for a loop of symlinks.
    resolved = Path(os.path.realpath(Path(path).expanduser()))
    if not resolved.is_dir():
        raise PresetError(f"{where}: {resolved} is not a directory")
    return resolved
