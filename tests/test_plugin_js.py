"""The plugin's JS entry, run by this machine's `node` against a fake OpenClaw `api` object."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from plugin_tools.payloads import PROVIDER_CONFIG_TOOL, STATUS_TOOL, ProviderConfigParams

REPO_ROOT = Path(__file__).resolve().parents[1]
# The plugin root (what OpenClaw passes as api.rootDir) is the repository root; the entry is in plugin_tools/.
PLUGIN_ENTRY = REPO_ROOT / "plugin_tools" / "index.js"

# Loads the entry, registers it against a fake api, runs each scenario from stdin and prints the results.
HARNESS = """
import { pathToFileURL } from "node:url";
const [entryPath, pluginDir] = process.argv.slice(2);
const plugin = (await import(pathToFileURL(entryPath).href)).default;
const scenarios = JSON.parse(await new Promise((resolve) => {
  let text = "";
  process.stdin.on("data", (chunk) => { text += chunk; });
  process.stdin.on("end", () => resolve(text));
}));
const out = { plugin: { id: plugin.id }, scenarios: {} };
for (const scenario of scenarios) {
  const tools = [];
  const registerTool = (tool) => tools.push(tool);
  plugin.register({ id: plugin.id, rootDir: pluginDir, pluginConfig: scenario.config, registerTool });
  out.registered = tools.map((t) => ({
    name: t.name, description: t.description, parameters: t.parameters, execute: typeof t.execute,
  }));
  if (!scenario.tool) continue;
  const tool = tools.find((t) => t.name === scenario.tool);
  const controller = new AbortController();
  if (scenario.abortAfterMs) setTimeout(() => controller.abort(), scenario.abortAfterMs);
  try {
    const result = await tool.execute("call-1", scenario.params, controller.signal);
    out.scenarios[scenario.name] = { result };
  } catch (err) {
    out.scenarios[scenario.name] = { threw: String(err) };
  }
}
console.log(JSON.stringify(out));
"""


def _script(path: Path, body: str) -> str:
    path.write_text("#!/bin/sh\n" + body + "\n", encoding="utf-8")
    path.chmod(0o755)
    return str(path)


def run_harness(tmp_path: Path, scenarios: list[dict[str, Any]], plugin_root: Path = REPO_ROOT) -> dict[str, Any]:
    """Run the scenarios in one node process, with plugin_root as api.rootDir, and return what it printed."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed on this machine: the plugin's JS entry cannot be run")
    harness = tmp_path / "harness.mjs"
    harness.write_text(HARNESS, encoding="utf-8")
    done = subprocess.run(
        [node, str(harness), str(PLUGIN_ENTRY), str(plugin_root)],
        input=json.dumps(scenarios),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=os.environ.copy(),
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _text_payload(outcome: dict[str, Any]) -> dict[str, Any]:
    assert "threw" not in outcome, outcome
    result = outcome["result"]
    assert [part["type"] for part in result["content"]] == ["text"]
    payload = json.loads(result["content"][0]["text"])
    assert payload == result["details"]
    return payload


def test_both_tools_are_registered_with_schemas(tmp_path: Path) -> None:
    out = run_harness(tmp_path, [{"name": "register", "config": {}}])
    assert out["plugin"]["id"] == "delta-mem-mlx"
    by_name = {tool["name"]: tool for tool in out["registered"]}
    assert set(by_name) == {STATUS_TOOL, PROVIDER_CONFIG_TOOL}
    for tool in by_name.values():
        assert tool["execute"] == "function"
        assert tool["description"]
        assert tool["parameters"]["type"] == "object"
        assert tool["parameters"]["additionalProperties"] is False
    provider_params = by_name[PROVIDER_CONFIG_TOOL]["parameters"]["properties"]
    assert set(provider_params) == set(ProviderConfigParams.__annotations__)


def test_tools_run_python_and_return_its_json(tmp_path: Path) -> None:
    config = {
        "pythonCommand": sys.executable,
        "sidecarRoot": str(tmp_path / "root"),
        "sidecarBaseUrl": "http://127.0.0.1:9",
    }
    out = run_harness(
        tmp_path,
        [
            {"name": "status", "config": config, "tool": STATUS_TOOL, "params": {}},
            {"name": "provider", "config": config, "tool": PROVIDER_CONFIG_TOOL, "params": {"modelId": "m"}},
            {"name": "bad", "config": config, "tool": PROVIDER_CONFIG_TOOL, "params": {"contextWindow": 10}},
        ],
    )
    status = _text_payload(out["scenarios"]["status"])
    assert status["tool"] == STATUS_TOOL and status["ready"] is False
    assert status["plugin_config"] == config
    provider = _text_payload(out["scenarios"]["provider"])
    assert provider["model_ref"] == "delta-mem-mlx/m"
    block = provider["config_patch"]["models"]["providers"]["delta-mem-mlx"]
    assert block["baseUrl"] == "http://127.0.0.1:9/v1"
    assert "16000" in _text_payload(out["scenarios"]["bad"])["problem"]


def test_the_checkout_venv_python_is_found_without_config(tmp_path: Path) -> None:
    if not (REPO_ROOT / ".venv" / "bin" / "python").exists():
        pytest.skip("this checkout has no .venv: nothing to find")
    out = run_harness(tmp_path, [{"name": "auto", "config": {}, "tool": PROVIDER_CONFIG_TOOL, "params": {}}])
    assert _text_payload(out["scenarios"]["auto"])["tool"] == PROVIDER_CONFIG_TOOL


def test_the_plugin_roots_venv_python_runs_from_the_plugin_root(tmp_path: Path) -> None:
    # The quick start's layout: the clone's .venv is a link to a venv beside the clone.
    root = tmp_path / "clone"
    venv = tmp_path / "clone.venv"
    (venv / "bin").mkdir(parents=True)
    root.mkdir()
    (root / ".venv").symlink_to(venv)
    reports = 'echo "{\\"python\\": \\"$0\\", \\"cwd\\": \\"$(pwd -P)\\", \\"path\\": \\"$PYTHONPATH\\"}"'
    _script(venv / "bin" / "python", reports)
    out = run_harness(
        tmp_path, [{"name": "auto", "config": {}, "tool": STATUS_TOOL, "params": {}}], plugin_root=root
    )
    ran = _text_payload(out["scenarios"]["auto"])
    assert ran["python"] == str(root / ".venv" / "bin" / "python")
    assert ran["cwd"] == str(root.resolve())
    assert ran["path"].split(os.pathsep)[0] == str(root)


def test_failures_come_back_as_readable_results(tmp_path: Path) -> None:
    scenarios = [
        ("missing", {"pythonCommand": str(tmp_path / "no-such-python")}, "cannot run"),
        ("garbage", {"pythonCommand": _script(tmp_path / "garbage", "echo 'hi there'")}, "not a JSON object"),
        ("array", {"pythonCommand": _script(tmp_path / "array", "echo '[1, 2]'")}, "not a JSON object"),
        (
            "crash",
            {"pythonCommand": _script(tmp_path / "crash", "echo 'Traceback: boom' >&2; exit 3")},
            "exited with code 3: Traceback: boom",
        ),
        (
            "timeout",
            {"pythonCommand": _script(tmp_path / "slow", "exec sleep 30"), "toolTimeoutSeconds": 1},
            "timed out after 1 s",
        ),
        (
            "flood",
            {"pythonCommand": _script(tmp_path / "flood", "exec yes '{}'")},
            "printed more than 1048576 bytes",
        ),
    ]
    out = run_harness(
        tmp_path,
        [{"name": name, "config": config, "tool": STATUS_TOOL, "params": {}} for name, config, _ in scenarios]
        + [
            {
                "name": "cancelled",
                "config": {"pythonCommand": _script(tmp_path / "slow2", "exec sleep 30")},
                "tool": PROVIDER_CONFIG_TOOL,
                "params": {},
                "abortAfterMs": 200,
            }
        ],
    )
    for name, _, expected in [*scenarios, ("cancelled", None, "cancelled")]:
        payload = _text_payload(out["scenarios"][name])
        assert set(payload) == {"tool", "summary", "problem", "hint"}, name
        assert expected in payload["problem"], (name, payload)
        assert payload["summary"].endswith(payload["problem"])
