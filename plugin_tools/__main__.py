"""`python -m plugin_tools <tool>`: a ToolRequest as JSON on stdin, exactly one JSON object on stdout.

Handled failures print a ToolProblem and still exit 0, so that the JS entry always has a
readable result to hand to OpenClaw. So does a bug: its traceback goes to stderr, and stdout
still carries one JSON object saying what failed.
"""

from __future__ import annotations

import json
import sys
import traceback
from typing import Any, Callable, Mapping

from common.errors import UserError
from plugin_tools.config_check import check_config
from plugin_tools.payloads import PROVIDER_CONFIG_TOOL, STATUS_TOOL, PluginConfig, ToolProblem
from plugin_tools.provider_config import build_provider_config, check_params
from plugin_tools.status import build_status


def _status(config: PluginConfig, params: dict[str, Any]) -> Mapping[str, Any]:
    return build_status(config)


def _provider_config(config: PluginConfig, params: dict[str, Any]) -> Mapping[str, Any]:
    return build_provider_config(config, check_params(params))


_TOOLS: dict[str, Callable[[PluginConfig, dict[str, Any]], Mapping[str, Any]]] = {
    STATUS_TOOL: _status,
    PROVIDER_CONFIG_TOOL: _provider_config,
}


def problem(tool: str, what: str, hint: str) -> ToolProblem:
    """A ToolProblem payload."""
    return {"tool": tool, "summary": f"{tool} failed: {what}", "problem": what, "hint": hint}


def parse_request(raw: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
    """The plugin config and the tool parameters from stdin; empty input means no config and no parameters."""
    try:
        text = raw.decode("utf-8")
        data = json.loads(text) if text.strip() else {}
    except RecursionError:
        raise ValueError("the JSON is nested too deeply") from None
    if not isinstance(data, dict):
        raise ValueError("stdin must hold a JSON object like {\"config\": {...}, \"params\": {...}}")
    config, params = data.get("config") or {}, data.get("params") or {}
    if not isinstance(config, dict) or not isinstance(params, dict):
        raise ValueError("'config' and 'params' must be JSON objects")
    return config, params


def run(argv: list[str], stdin: bytes) -> dict[str, Any]:
    """Run one tool call and return the object to print."""
    if len(argv) != 1 or argv[0] not in _TOOLS:
        name = argv[0] if argv else "plugin_tools"
        return dict(problem(name, f"unknown tool {' '.join(argv)!r}", f"use one of: {', '.join(_TOOLS)}"))
    tool = argv[0]
    try:
        config, params = parse_request(stdin)
    except ValueError as exc:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        hint = "send a JSON object with 'config' and 'params'"
        return dict(problem(tool, f"bad request on stdin: {exc}", hint))
    try:
        return dict(_TOOLS[tool](check_config(config), params))
    except UserError as exc:
        hint = exc.hint or "fix the value named above in the plugin config or the tool call"
        return dict(problem(tool, exc.describe(), hint))
    except Exception as exc:  # a bug: the JS entry still needs one JSON object
        traceback.print_exc()
        what = f"internal error ({type(exc).__name__}: {exc})"
        return dict(problem(tool, what, "this is a bug in delta-mem-mlx: report it with the traceback on stderr"))


def encode(result: dict[str, Any]) -> bytes:
    """One line of JSON; ASCII-escaped when a string cannot be UTF-8 (a path with undecodable bytes)."""
    try:
        return (json.dumps(result, ensure_ascii=False) + "\n").encode("utf-8")
    except UnicodeEncodeError:
        return (json.dumps(result) + "\n").encode("ascii")


def main() -> None:
    """Entry point of `python -m plugin_tools`."""
    result = run(sys.argv[1:], sys.stdin.buffer.read())
    sys.stdout.buffer.write(encode(result))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
