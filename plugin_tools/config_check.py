"""The plugin config and tool parameters, checked before anything uses them.

OpenClaw validates the config against the manifest's `configSchema`, but the tools also run by
hand and a model writes the parameters, so every value is checked here against the same schema
(keys, JSON types, enums, bounds), and strings must be text a path or URL can hold: no NUL, no
lone UTF-16 surrogate.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from common.errors import UserError
from plugin_tools.payloads import PluginConfig

# The plugin is the repository root: the manifest sits beside this package.
MANIFEST = Path(__file__).resolve().parents[1] / "openclaw.plugin.json"
# Longer than any path or URL a config holds, short enough to keep every answer small.
MAX_STRING_CHARS = 4096
_JSON_TYPES: dict[str, tuple[type, ...]] = {"string": (str,), "integer": (int,), "boolean": (bool,)}


class PluginConfigError(UserError, ValueError):
    """A plugin config key or tool parameter that is unknown or has an unusable value."""


@functools.cache
def config_schema() -> dict[str, Any]:
    """The manifest's `configSchema` (the one OpenClaw checks the config against)."""
    try:
        text = MANIFEST.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PluginConfigError(
            f"the plugin manifest {MANIFEST} is missing",
            hint="run the tools from a clone of openclaw-delta-mem-mlx (the plugin is the clone)",
        ) from None
    schema: dict[str, Any] = json.loads(text)["configSchema"]
    return schema


def check_config(config: dict[str, Any]) -> PluginConfig:
    """The plugin config, when every key is declared and every value fits its schema."""
    check_values("plugin config", config, config_schema()["properties"])
    return config  # type: ignore[return-value]


def check_values(what: str, values: dict[str, Any], properties: dict[str, dict[str, Any]]) -> None:
    """Raise PluginConfigError naming the first unknown key or unusable value of `values`."""
    unknown = sorted(set(values) - set(properties))
    if unknown:
        shown = ", ".join(_short(name) for name in unknown[:5])
        raise PluginConfigError(f"unknown {what} key(s) {shown}; known: {', '.join(properties)}")
    for name, value in values.items():
        problem = value_problem(value, properties[name])
        if problem is not None:
            raise PluginConfigError(f"{what} {name} {problem} (got {_short(value)})")


def value_problem(value: Any, spec: dict[str, Any]) -> str | None:
    """What is wrong with `value` against one JSON-schema property (type, enum, bounds), or None."""
    expected = spec["type"]
    if isinstance(value, bool) != (expected == "boolean") or not isinstance(value, _JSON_TYPES[expected]):
        return f"must be a{'n' if expected == 'integer' else ''} {expected}"
    if "enum" in spec and value not in spec["enum"]:
        return f"must be one of {', '.join(map(str, spec['enum']))}"
    if expected == "integer":
        low, high = spec.get("minimum"), spec.get("maximum")
        if (low is not None and value < low) or (high is not None and value > high):
            return f"must be between {low if low is not None else '-∞'} and {high if high is not None else '∞'}"
    if expected == "string":
        return _text_problem(value, spec.get("minLength", 0))
    return None


def _text_problem(text: str, min_length: int) -> str | None:
    if len(text) < min_length:
        return "must not be empty"
    if len(text) > MAX_STRING_CHARS:
        return f"is longer than {MAX_STRING_CHARS} characters"
    if "\0" in text:
        return "holds a NUL character"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "holds a lone UTF-16 surrogate (not text)"
    return None


def _short(value: Any) -> str:
    shown = repr(value)
    return shown if len(shown) <= 60 else shown[:57] + "..."
