"""Real outputs of `python -m plugin_tools` against JSON schemas derived from plugin_tools/payloads.py."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import types
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import (
    Any,
    Literal,
    Union,
    get_args,
    get_origin,
    get_type_hints,
    is_typeddict,
)

import jsonschema_rs
import pytest

from common.receipt import new_receipt, write_receipt
from common.settings import SidecarSettings, save_settings
from plugin_tools import payloads
from plugin_tools.payloads import (
    PluginConfig,
    ProviderConfigPayload,
    StatusPayload,
    ToolProblem,
)
from plugin_tools.status import build_status

REPO_ROOT = Path(__file__).resolve().parents[1]
# The repository root is the OpenClaw plugin: its manifest and package.json sit beside pyproject.toml.
MANIFEST = json.loads((REPO_ROOT / "openclaw.plugin.json").read_text(encoding="utf-8"))
# OpenClaw grades a tool call by these result keys (docs/plugins/tool-plugins.md, "Output contracts").
RESERVED_RESULT_KEYS = {"status", "ok", "success", "error", "timedOut", "exitCode"}


_SCALARS: dict[Any, dict[str, Any]] = {
    str: {"type": "string"},
    bool: {"type": "boolean"},
    int: {"type": "integer"},
    float: {"type": "number"},
    type(None): {"type": "null"},
    Any: {},
}


def schema_for(shape: Any) -> dict[str, Any]:
    """The JSON schema of a payload type; TypedDicts become closed objects (undeclared keys are errors)."""
    if shape in _SCALARS:
        return dict(_SCALARS[shape])
    if is_typeddict(shape):
        hints = get_type_hints(shape)
        return {
            "type": "object",
            "properties": {name: schema_for(hint) for name, hint in hints.items()},
            "required": sorted(shape.__required_keys__),
            "additionalProperties": False,
        }
    origin, args = get_origin(shape), get_args(shape)
    if origin is Literal:
        return {"enum": list(args)}
    if origin in (Union, types.UnionType):
        return {"anyOf": [schema_for(arg) for arg in args]}
    if origin is list:
        return {"type": "array", "items": schema_for(args[0])}
    if origin is dict:
        return {"type": "object", "additionalProperties": schema_for(args[1])}
    raise TypeError(f"no JSON schema for {shape!r}")


def assert_valid(shape: Any, instance: Any) -> None:
    """Raise with the schema's complaint when `instance` is not a valid `shape`."""
    jsonschema_rs.validator_for(schema_for(shape)).validate(instance)


def run_tool(tool: str, request: str) -> dict[str, Any]:
    """`python -m plugin_tools <tool>` with `request` on stdin; it must exit 0 and print one JSON object."""
    done = subprocess.run(
        [sys.executable, "-m", "plugin_tools", tool],
        input=request,
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1, done.stdout
    return json.loads(lines[0])


class _Health(BaseHTTPRequestHandler):
    body = b'{"status": "ok", "model": "tiny-test"}'

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        code = 200 if self.path == "/health" else 404
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def health_server() -> Iterator[int]:
    """A fake sidecar answering /health on a free loopback port."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture()
def installed_root(tmp_path: Path, health_server: int) -> Path:
    """A root with settings, a model directory and a receipt, whose sidecar port is the fake server's."""
    root, model = tmp_path / "root", tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}", encoding="utf-8")
    save_settings(root, SidecarSettings(model_path=str(model), model_id="tiny-test", port=health_server))
    receipt = new_receipt(
        root,
        preset="custom",
        model_id="tiny-test",
        model_source=str(model),
        adapter_source=None,
        model_path=model,
        adapter_path=None,
        supervisor="process",
        files=[model / "config.json"],
    )
    write_receipt(root, receipt)
    return root


def test_the_schema_rejects_undeclared_and_reserved_keys() -> None:
    problem = {"tool": "t", "summary": "s", "problem": "p", "hint": "h"}
    assert_valid(ToolProblem, problem)
    with pytest.raises(jsonschema_rs.ValidationError):
        assert_valid(ToolProblem, {**problem, "status": "failed"})
    with pytest.raises(jsonschema_rs.ValidationError):
        assert_valid(ToolProblem, {"tool": "t", "summary": "s", "problem": "p"})


@pytest.mark.parametrize("shape", [StatusPayload, ProviderConfigPayload, ToolProblem])
def test_no_payload_uses_a_result_key_openclaw_interprets(shape: Any) -> None:
    assert not set(shape.__annotations__) & RESERVED_RESULT_KEYS


def test_provider_config_output_matches_its_schema() -> None:
    payload = run_tool(payloads.PROVIDER_CONFIG_TOOL, json.dumps({"config": {}, "params": {"modelId": "m"}}))
    assert_valid(ProviderConfigPayload, payload)
    assert payload["model_ref"] == "delta-mem-mlx/m"


def test_status_of_an_empty_root_matches_its_schema(tmp_path: Path) -> None:
    config = {"sidecarRoot": str(tmp_path / "empty"), "sidecarBaseUrl": "http://127.0.0.1:9/v1"}
    payload = run_tool(payloads.STATUS_TOOL, json.dumps({"config": config}))
    assert_valid(StatusPayload, payload)
    assert payload["ready"] is False
    assert payload["install"]["receipt_present"] is False
    assert payload["health"]["reachable"] is False
    assert "install-sidecar" in payload["next_steps"][0]
    assert payload["plugin_config"] == config


def test_status_of_an_installed_healthy_root(installed_root: Path, health_server: int) -> None:
    payload = build_status({"sidecarRoot": str(installed_root), "attentionMode": "qmd"})
    assert_valid(StatusPayload, payload)
    assert payload["ready"] is True, payload
    assert payload["install"]["preset"] == "custom"
    assert payload["install"]["model_present"] is True
    assert payload["install"]["adapter_present"] is None
    assert payload["health"]["http_code"] == 200
    assert payload["health"]["body"] == {"status": "ok", "model": "tiny-test"}
    assert payload["health"]["url"] == f"http://127.0.0.1:{health_server}/health"
    assert payload["supervisor"]["kind"] == "process"
    assert any("--attention-state-source qmd" in note for note in payload["notes"])


def test_status_names_a_damaged_install(installed_root: Path, tmp_path: Path) -> None:
    (tmp_path / "model" / "config.json").write_text('{"changed": true}', encoding="utf-8")
    payload = build_status({"sidecarRoot": str(installed_root)})
    assert_valid(StatusPayload, payload)
    assert payload["ready"] is False
    assert payload["install"]["installed"] is False
    assert any("config.json" in problem for problem in payload["install"]["problems"])
    assert "problem" in payload["summary"]


def test_status_reports_a_plugin_url_that_differs_from_the_install(installed_root: Path) -> None:
    payload = build_status({"sidecarRoot": str(installed_root), "sidecarBaseUrl": "http://127.0.0.1:1/v1"})
    assert payload["ready"] is True
    assert any("configured for http://127.0.0.1:1/v1" in note for note in payload["notes"])


@pytest.mark.parametrize(
    ("argv", "stdin", "expected"),
    [
        (["nope"], "{}", "unknown tool"),
        ([payloads.STATUS_TOOL], "not json", "bad request on stdin"),
        ([payloads.STATUS_TOOL], "[1]", "bad request on stdin"),
        ([payloads.PROVIDER_CONFIG_TOOL], '{"params": {"contextWindow": 100}}', "minimum of 16000"),
        ([payloads.PROVIDER_CONFIG_TOOL], '{"config": {"sidecarBaseUrl": "nonsense"}}', "not an http(s) URL"),
    ],
)
def test_handled_failures_print_a_problem_and_exit_0(argv: list[str], stdin: str, expected: str) -> None:
    payload = run_tool(argv[0], stdin)
    assert_valid(ToolProblem, payload)
    assert expected in payload["problem"]


def test_manifest_config_schema_matches_the_plugin_config_shape() -> None:
    declared = MANIFEST["configSchema"]
    derived = schema_for(PluginConfig)
    assert declared["additionalProperties"] is False
    assert set(declared["properties"]) == set(derived["properties"])
    for name, prop in declared["properties"].items():
        expected = derived["properties"][name]
        assert prop["type"] == expected.get("type", "string"), name
        assert prop.get("enum") == expected.get("enum"), name
    defaults = {name: prop["default"] for name, prop in declared["properties"].items()}
    assert set(defaults) == set(declared["properties"]), "every config key has a default"
    assert_valid(PluginConfig, defaults)
    jsonschema_rs.validator_for(declared).validate(defaults)


def test_manifest_declares_both_tools_and_the_platform() -> None:
    tools = [payloads.STATUS_TOOL, payloads.PROVIDER_CONFIG_TOOL]
    assert MANIFEST["id"] == payloads.PROVIDER_ID
    assert MANIFEST["contracts"]["tools"] == tools
    assert set(MANIFEST["toolMetadata"]) == set(tools)
    assert MANIFEST["enabledByDefaultOnPlatforms"] == ["darwin"]
    package = json.loads((REPO_ROOT / "package.json").read_text(encoding="utf-8"))
    assert package["openclaw"]["extensions"] == ["./plugin_tools/index.js"]
    assert package["openclaw"]["compat"]["pluginApi"] == ">=2026.3.24-beta.2"
    assert package["openclaw"]["install"]["minHostVersion"]
    assert not package.get("dependencies")
    assert (REPO_ROOT / "plugin_tools" / "index.js").is_file()
    # One copy of each: a second one in plugin_tools/ would be a second plugin root.
    assert not (REPO_ROOT / "plugin_tools" / "openclaw.plugin.json").exists()
    assert not (REPO_ROOT / "plugin_tools" / "package.json").exists()


def test_plugin_tools_never_import_mlx() -> None:
    code = (
        "import sys, plugin_tools.__main__, installer.openclaw_config; "
        "heavy = {'mlx', 'mlx_lm', 'fastapi', 'uvicorn'}; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]"
