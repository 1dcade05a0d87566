"""The sidecar's settings and its settings file (`sidecar.json` in an install root).

The installer writes this file, `delta-mem-mlx serve --root` and the plugin tools read it.
This module must stay importable without MLX.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from common.errors import UserError
from common.files import atomic_write_json, read_regular_file
from common.kv_budget import DEFAULT_MAX_DISK_BYTES, KV_BITS, KV_GROUP_SIZES

SETTINGS_FILE = "sidecar.json"
SETTINGS_VERSION = 1

AttentionStateSource = Literal["request", "qmd", "none"]
QmdMode = Literal["vsearch", "search", "query"]
WritePolicy = Literal["all", "skip-system"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
# An upper bound against mistakes (mlx-lm's own server decodes up to 32 rows by default).
MAX_BATCH = 64
# Smaller prefill steps spend more on per-call overhead than they save in stream latency.
MIN_PREFILL_CHUNK = 16
# A settings file is under a kilobyte; anything far bigger is not one.
MAX_SETTINGS_BYTES = 1024**2


class SettingsError(UserError, ValueError):
    """A settings file or value that cannot be used, with the reason."""


@dataclass
class QmdSettings:
    """How to ask QMD for memory snippets when a request carries none."""

    bin: str = "qmd"
    mode: QmdMode = "vsearch"
    limit: int = 6
    timeout: float = 5.0
    collection: str | None = None
    index: str | None = None
    min_score: float | None = None


@dataclass
class SidecarSettings:
    """Everything `serve` needs to start; paths are absolute once loaded."""

    model_path: str
    model_id: str
    adapter_path: str | None = None
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    context_window: int = 32768
    max_output_tokens: int = 4096
    state_dir: str | None = None
    api_key: str | None = None
    max_sessions: int = 16
    max_kv_bytes: int = 8 * 1024**3
    kv_bits: int | None = None  # None: float K/V; 8 or 4: mlx-lm's quantized format
    kv_group_size: int = 64
    max_disk_bytes: int = DEFAULT_MAX_DISK_BYTES  # KV kept on disk across restarts; 0: off
    attention_state_source: AttentionStateSource = "request"
    write_policy: WritePolicy = "all"
    prefix_cache: bool = True
    # Sessions reference the shared prefix's K/V (held once) instead of holding a private copy of it.
    share_prefix: bool = True
    max_batch: int = 8
    prefill_chunk: int = 512
    # Seconds with no request in flight after which the model and its KV are unloaded (sessions stay
    # on disk; the next request loads it again). 0: never.
    keep_alive_s: float = 0.0
    qmd: QmdSettings = field(default_factory=QmdSettings)

    def validate(self) -> None:
        """Raise SettingsError naming the first setting that cannot work."""
        if not self.model_path:
            raise SettingsError("model_path is empty: pass --model or install a preset first")
        if not self.model_id:
            raise SettingsError("model_id is empty")
        if not 0 < self.port < 65536:
            raise SettingsError(f"port {self.port} is not in 1..65535")
        if self.context_window < 256:
            raise SettingsError(f"context_window {self.context_window} is too small (minimum 256)")
        if self.max_sessions < 1:
            raise SettingsError("max_sessions must be at least 1")
        if self.max_kv_bytes < 1:
            raise SettingsError("max_kv_bytes must be positive")
        if self.max_disk_bytes < 0:
            raise SettingsError("max_disk_bytes must be 0 (no disk cache) or positive")
        if not 1 <= self.max_batch <= MAX_BATCH:
            raise SettingsError(f"max_batch must be in 1..{MAX_BATCH} (got {self.max_batch})")
        if not MIN_PREFILL_CHUNK <= self.prefill_chunk <= self.context_window:
            raise SettingsError(
                f"prefill_chunk must be in {MIN_PREFILL_CHUNK}..{self.context_window} (the context window); "
                f"got {self.prefill_chunk}"
            )
        if self.keep_alive_s < 0:
            raise SettingsError("keep_alive_s must be 0 (never unload) or positive")
        if self.keep_alive_s and self.state_dir is None:
            raise SettingsError(
                "unloading when idle needs a state dir (sessions wait there while the model is unloaded): "
                "pass --state-dir, or --keep-alive never"
            )
        if self.kv_bits is not None and self.kv_bits not in KV_BITS:
            raise SettingsError(f"kv_bits must be null (float), 8 or 4 (got {self.kv_bits!r})")
        if self.kv_group_size not in KV_GROUP_SIZES:
            raise SettingsError(f"kv_group_size must be one of {', '.join(map(str, KV_GROUP_SIZES))}")
        _check_choice("attention_state_source", self.attention_state_source, AttentionStateSource)
        _check_choice("write_policy", self.write_policy, WritePolicy)
        _check_choice("qmd.mode", self.qmd.mode, QmdMode)
        if self.qmd.limit < 1:
            raise SettingsError("qmd.limit must be at least 1")
        if self.qmd.timeout <= 0:
            raise SettingsError("qmd.timeout must be positive")
        if not is_loopback(self.host) and not self.api_key:
            raise SettingsError(
                f"refusing to listen on {self.host} without an API key: anyone on the network "
                "could use the model and read session memory. Pass --api-key KEY (clients then "
                "send 'Authorization: Bearer KEY') or bind 127.0.0.1."
            )

    def to_dict(self) -> dict[str, Any]:
        """The JSON form written to the settings file."""
        return {"version": SETTINGS_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SidecarSettings":
        """Build settings from a settings-file dict, rejecting unknown or mistyped keys."""
        data = dict(data)
        data.pop("version", None)
        qmd_data = data.pop("qmd", None) or {}
        if not isinstance(qmd_data, dict):
            raise SettingsError("qmd must be an object")
        try:
            qmd = QmdSettings(**qmd_data)
            settings = cls(**data, qmd=qmd)
        except TypeError as exc:
            raise SettingsError(f"bad settings: {exc}") from exc
        _check_types(settings)
        _check_types(settings.qmd)
        return settings


def settings_path(root: Path) -> Path:
    """Where an install root keeps the sidecar's settings."""
    return Path(root) / SETTINGS_FILE


def load_settings(root: Path) -> SidecarSettings:
    """Read and validate the settings file of an install root."""
    path = settings_path(root)
    try:
        data = json.loads(read_regular_file(path, MAX_SETTINGS_BYTES).decode("utf-8"))
    except FileNotFoundError:
        raise SettingsError(
            f"{path} does not exist: run 'delta-mem-mlx install-sidecar --root {root}' first"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SettingsError(f"{path} cannot be read: {exc}") from exc
    if not isinstance(data, dict):
        raise SettingsError(f"{path} must hold a JSON object")
    try:
        settings = SidecarSettings.from_dict(data)
    except SettingsError as exc:
        raise SettingsError(f"{path}: {exc}") from exc
    settings.validate()
    return settings


def save_settings(root: Path, settings: SidecarSettings) -> Path:
    """Validate and atomically write the settings file; owner-only because it may hold a key."""
    settings.validate()
    path = settings_path(root)
    atomic_write_json(path, settings.to_dict(), mode=0o600)
    return path


def is_loopback(host: str) -> bool:
    """True for names and addresses that only this machine can reach."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_choice(name: str, value: str, choices: Any) -> None:
    allowed = get_args(choices)
    if value not in allowed:
        raise SettingsError(f"{name} must be one of {', '.join(allowed)} (got {value!r})")


_SCALAR_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "float": (int, float),
    "str | None": (str, type(None)),
    "int | None": (int, type(None)),
    "float | None": (int, float, type(None)),
    "bool": (bool,),
}


def _check_types(obj: Any) -> None:
    for f in dataclasses.fields(obj):
        expected = _SCALAR_TYPES.get(str(f.type))
        value = getattr(obj, f.name)
        if expected is None:
            continue
        if (isinstance(value, bool) and bool not in expected) or not isinstance(value, expected):
            raise SettingsError(f"{f.name} has the wrong type: {type(value).__name__}")
