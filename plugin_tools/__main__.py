"""`python -m plugin_tools <tool>`: a ToolRequest as JSON on stdin, exactly one JSON object on stdout.

Handled failures print a ToolProblem and still exit 0, so that the JS entry always has a
readable result to hand to OpenClaw.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Callable, Mapping

from common.errors import UserError
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


def parse_request(raw: str) -> tuple[PluginConfig, dict[str, Any]]:
    """The plugin config and the tool parameters from stdin; empty input means no config and no parameters."""
    data = json.loads(raw) if raw.strip() else {}
    if not isinstance(data, dict):
        raise ValueError("stdin must hold a JSON object like {\"config\": {...}, \"params\": {...}}")
    config, params = data.get("config") or {}, data.get("params") or {}
    if not isinstance(config, dict) or not isinstance(params, dict):
        raise ValueError("'config' and 'params' must be JSON objects")
    return config, params  # type: ignore[return-value]


def run(argv: list[str], stdin: str) -> dict[str, Any]:
    """Run one tool call and return the object to print."""
    if len(argv) != 1 or argv[0] not in _TOOLS:
        name = argv[0] if argv else "plugin_tools"
        return dict(problem(name, f"unknown tool {' '.join(argv)!r}", f"use one of: {', '.join(_TOOLS)}"))
    tool = argv[0]
    try:
        config, params = parse_request(stdin)
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        hint = "send a JSON object with 'config' and 'params'"
        return dict(problem(tool, f"bad request on stdin: {exc}", hint))
    try:
        return dict(_TOOLS[tool](config, params))
    except UserError as exc:
        hint = exc.hint or "fix the value named above in the plugin config or the tool call"
        return dict(problem(tool, exc.describe(), hint))


def main() -> None:
    """Entry point of `python -m plugin_tools`."""
    result = run(sys.argv[1:], sys.stdin.read())
    sys.stdout.write(json.dumps(result, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
