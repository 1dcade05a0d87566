"""Merging the delta-mem-mlx provider into OpenClaw's config file, keeping everything else in it.

openclaw.json may be JSON5 (comments, trailing commas, unquoted keys); it is read with `json5`
and written back as plain JSON, so such syntax is lost: the timestamped backup keeps it.

Only a regular file of a sane size is read (a FIFO would block for ever, `/dev/zero` never ends,
and `json5` is pure Python: about 30 s per MB on a small machine), a read-only file is left
alone, and every refusal says that nothing was changed.
"""

from __future__ import annotations

import copy
import errno
import json
import os
import stat
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import json5

from common.errors import UserError
from common.files import atomic_write_bytes, read_regular_file
from plugin_tools.payloads import ConfigPatch

CONFIG_FILE = "openclaw.json"
# The config may carry API keys; a new file is readable by its owner only, as OpenClaw writes it.
NEW_FILE_MODE = 0o600
# OpenClaw's own config is a few KB; these bounds keep a wrong --config from hanging the command.
MAX_CONFIG_BYTES = 4 * 1024**2
MAX_JSON5_BYTES = 256 * 1024


class OpenClawConfigError(UserError, ValueError):
    """openclaw.json cannot be read or merged; nothing was changed."""

    topic = "OpenClaw config"


@dataclass(frozen=True)
class ApplyResult:
    """What `apply_patch` did to the config file."""

    path: Path
    backup: Path | None
    created: bool
    comments_dropped: bool
    previous_default: str | None


def openclaw_config_path() -> Path:
    """Where OpenClaw reads its config: $OPENCLAW_CONFIG_PATH, $OPENCLAW_STATE_DIR, $OPENCLAW_HOME or ~."""
    explicit = os.environ.get("OPENCLAW_CONFIG_PATH", "").strip()
    if explicit:
        return Path(explicit).expanduser()
    state_dir = os.environ.get("OPENCLAW_STATE_DIR", "").strip()
    if state_dir:
        return Path(state_dir).expanduser() / CONFIG_FILE
    home = os.environ.get("OPENCLAW_HOME", "").strip()
    return (Path(home).expanduser() if home else Path.home()) / ".openclaw" / CONFIG_FILE


def config_target(path: Path) -> Path:
    """The file `--config` names, symlinks followed (a symlinked config is written through, as OpenClaw does)."""
    path = Path(path).expanduser().absolute()
    try:
        return Path(os.path.realpath(path, strict=True))
    except FileNotFoundError:
        return Path(os.path.realpath(path))  # a new file, or a dangling link whose target is created
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OpenClawConfigError(f"{path} is a loop of symbolic links; nothing was changed") from exc
        raise OpenClawConfigError(f"{path} cannot be reached ({exc.strerror}); nothing was changed") from exc


def read_config(path: Path) -> bytes | None:
    """The bytes of the config file at `path` (symlinks already followed), or None when there is none.

    Refuses anything but a regular file of at most MAX_CONFIG_BYTES, without blocking on a FIFO.
    """
    try:
        return read_regular_file(path, MAX_CONFIG_BYTES)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EFBIG):
            raise OpenClawConfigError(f"{path} cannot be read ({exc.strerror}); nothing was changed") from exc
        raise OpenClawConfigError(
            f"{path} {exc.strerror}, so it is not OpenClaw's config; nothing was changed",
            hint="pass --config with the path of OpenClaw's JSON config file (openclaw.json)",
        ) from exc


def parse_config(raw: bytes, path: Path) -> tuple[dict[str, Any], bool]:
    """The config object, and whether it uses JSON5 syntax that plain JSON cannot keep."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise OpenClawConfigError(f"{path} is not UTF-8 text ({exc}); nothing was changed") from exc
    # Plain JSON is read with the json module: json5 splits an escaped surrogate pair ("\ud83d\ude00")
    # into two lone halves, which no UTF-8 file can hold.
    try:
        data, json5_only = json.loads(text), False
    except (ValueError, RecursionError):
        if len(raw) > MAX_JSON5_BYTES:
            raise OpenClawConfigError(
                f"{path} is not plain JSON, and at {len(raw) // 1024} KB it is too large to read as JSON5 "
                f"(at most {MAX_JSON5_BYTES // 1024} KB); nothing was changed",
                hint="make it plain JSON (no comments or trailing commas), or check that it is OpenClaw's config",
            ) from None
        try:
            data, json5_only = json5.loads(text), True
        except (ValueError, RecursionError) as exc:
            raise OpenClawConfigError(
                f"{path} cannot be parsed as JSON5 ({exc}); nothing was changed. "
                "Fix it (openclaw config validate shows where) and run the command again"
            ) from exc
    if not isinstance(data, dict):
        raise OpenClawConfigError(
            f"{path} must hold one object, not {type(data).__name__}; nothing was changed"
        )
    return data, json5_only


def merge_patch(
    config: dict[str, Any], patch: ConfigPatch, set_default: bool
) -> tuple[dict[str, Any], str | None]:
    """A copy of `config` with the patch merged in, and the default model it replaced (if any).

    The delta-mem-mlx provider entry is replaced as a whole (it is ours); every other key is kept.
    """
    merged = copy.deepcopy(config)
    models = _object(merged, "models")
    models.setdefault("mode", patch["models"]["mode"])
    _object(models, "providers", "models").update(copy.deepcopy(patch["models"]["providers"]))
    defaults = _object(_object(merged, "agents"), "defaults", "agents")
    per_model = _object(defaults, "models", "agents.defaults")
    for ref, entry in patch["agents"]["defaults"]["models"].items():
        _object(per_model, ref, "agents.defaults.models").update(entry)
    if not set_default:
        return merged, None
    primary = patch["agents"]["defaults"]["model"]["primary"]
    current = defaults.get("model")
    if isinstance(current, dict):
        previous = current.get("primary")
        current["primary"] = primary
    else:
        # The string form names only the primary model; the object form also keeps fallbacks.
        previous = current
        defaults["model"] = {"primary": primary}
    return merged, previous if isinstance(previous, str) and previous != primary else None


def apply_patch(
    path: Path, patch: ConfigPatch, set_default: bool = True, now: datetime | None = None
) -> ApplyResult:
    """Merge the patch into the config file at `path`: backup first, then one atomic write."""
    path = config_target(path)
    raw = read_config(path)
    config, json5_only = parse_config(raw, path) if raw is not None else ({}, False)
    merged, previous = merge_patch(config, patch, set_default)
    new_bytes = _json_bytes(merged)
    mode = NEW_FILE_MODE if raw is None else _writable_mode(path)
    backup = None if raw is None else _backup_path(path, now or datetime.now(timezone.utc))
    try:
        if backup is not None:
            atomic_write_bytes(backup, raw, mode)
        atomic_write_bytes(path, new_bytes, mode)
    except OSError as exc:
        kept = f" (the backup {backup} was written)" if backup is not None and backup.exists() else ""
        raise OpenClawConfigError(
            f"cannot write {exc.filename or path.parent} ({exc.strerror}): {path} is unchanged{kept}",
            hint="free some space and run the command again"
            if exc.errno == errno.ENOSPC
            else f"make {path.parent} writable for you, or pass --config with a file in a folder you can write",
        ) from exc
    return ApplyResult(path, backup, raw is None, json5_only, previous)


def _writable_mode(path: Path) -> int:
    """The mode of an existing config, after checking its owner did not make it read-only."""
    mode = stat.S_IMODE(path.stat().st_mode)
    # The write bits are checked too: root may write anywhere, but a 0444 file says "leave me alone".
    if not mode & 0o222 or not os.access(path, os.W_OK):
        raise OpenClawConfigError(
            f"{path} is read-only (mode {mode:04o}); nothing was changed",
            hint=f"make it writable (chmod u+w {path}) if it should change, then run the command again",
        )
    return mode


def _json_bytes(config: dict[str, Any]) -> bytes:
    text = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        # The file escaped half of a surrogate pair ("\ud800"): only an escaped file can hold it again.
        return (json.dumps(config, indent=2) + "\n").encode("ascii")


def _object(parent: dict[str, Any], key: str, where: str = "") -> dict[str, Any]:
    value = parent.setdefault(key, {})
    if not isinstance(value, dict):
        name = f"{where}.{key}" if where else key
        raise OpenClawConfigError(
            f"{name} in openclaw.json is a {type(value).__name__}, not an object; "
            "fix it by hand (nothing was changed)"
        )
    return value


def _backup_path(path: Path, now: datetime) -> Path:
    stamp = now.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    candidate = path.with_name(f"{path.name}.bak-{stamp}")
    counter = 2
    while candidate.exists():
        candidate = path.with_name(f"{path.name}.bak-{stamp}-{counter}")
        counter += 1
    return candidate
