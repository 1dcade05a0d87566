"""Hostile calls of `python -m plugin_tools`: every one prints exactly one JSON object, never a traceback.

- every config key of the manifest and every tool parameter, with every JSON type it must not have:
  refused as a ToolProblem that names the key;
- hypothesis: arbitrary JSON for the config and the parameters of the provider tool;
- through the real process: the calls the issue found (numbers and lists for paths, NUL, a lone
  surrogate, a symlink loop, 100,000-deep JSON, bytes that are not UTF-8).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability import record_figures

from plugin_tools.__main__ import encode, run
from plugin_tools.config_check import config_schema
from plugin_tools.payloads import PROVIDER_CONFIG_TOOL, STATUS_TOOL

CONFIG_KEYS = config_schema()["properties"]
PARAMS = {"baseUrl": "string", "modelId": "string", "contextWindow": "integer", "maxTokens": "integer"}
SAMPLES: dict[str, Any] = {
    "null": None, "boolean": True, "integer": 7, "float": 1.5, "string": "x", "array": [1], "object": {"a": 1},
}  # fmt: skip
COUNTS = {"calls": 0, "problems": 0, "internal_errors": 0}


def call(tool: str, request: Any) -> dict[str, Any]:
    """One in-process call, through the same encoding the process prints."""
    raw = json.dumps(request).encode("utf-8") if not isinstance(request, bytes) else request
    printed = encode(run([tool], raw))
    assert printed.endswith(b"\n") and printed.count(b"\n") == 1
    result = json.loads(printed)
    assert isinstance(result, dict) and result.get("tool") == tool
    COUNTS["calls"] += 1
    COUNTS["problems"] += "problem" in result
    COUNTS["internal_errors"] += "internal error" in result.get("problem", "")
    return result


def wrong_types(expected: str) -> list[str]:
    right = {"string": {"string"}, "integer": {"integer"}, "boolean": {"boolean"}}[expected]
    return [name for name in SAMPLES if name not in right]


@pytest.fixture(autouse=True)
def _no_sidecar(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DELTA_MEM_MLX_ROOT", str(tmp_path / "root"))


@pytest.mark.parametrize("tool", [STATUS_TOOL, PROVIDER_CONFIG_TOOL])
@pytest.mark.parametrize("key", sorted(CONFIG_KEYS))
def test_every_config_key_with_every_wrong_json_type_is_named(key: str, tool: str) -> None:
    for type_name in wrong_types(CONFIG_KEYS[key]["type"]):
        result = call(tool, {"config": {key: SAMPLES[type_name]}})
        assert f"plugin config {key} must be a" in result.get("problem", ""), (key, type_name, result)


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_every_parameter_with_every_wrong_json_type_is_named(name: str) -> None:
    for type_name in wrong_types(PARAMS[name]):
        result = call(PROVIDER_CONFIG_TOOL, {"params": {name: SAMPLES[type_name]}})
        assert name in result.get("problem", "") and "internal error" not in result["problem"], result


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
config_keys = st.sampled_from(sorted(CONFIG_KEYS)) | st.text(max_size=12)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    config=st.dictionaries(config_keys, json_values, max_size=4),
    params=st.dictionaries(st.sampled_from(sorted(PARAMS)) | st.text(max_size=8), json_values, max_size=3),
)
def test_arbitrary_json_always_answers_one_json_object(config: dict[str, Any], params: dict[str, Any]) -> None:
    result = call(PROVIDER_CONFIG_TOOL, {"config": config, "params": params})
    assert "internal error" not in result.get("problem", ""), result


def test_the_hostile_calls_through_the_real_process(tmp_path: Path) -> None:
    loop = tmp_path / "loop"
    loop.symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(loop)
    requests: list[bytes] = [
        json.dumps({"config": {"sidecarRoot": 5}}).encode(),
        json.dumps({"config": {"sidecarRoot": ["a"]}}).encode(),
        json.dumps({"config": {"sidecarBaseUrl": 8765}}).encode(),
        json.dumps({"config": {"attentionAdapter": 1}}).encode(),
        json.dumps({"config": {"sidecarRoot": "a\0b"}}).encode(),
        b'{"config": {"modelId": "\\ud800"}}',
        json.dumps({"config": {"sidecarRoot": str(loop)}}).encode(),
        json.dumps({"config": {"contextWindow": 10**400}}).encode(),
        json.dumps({"params": {"baseUrl": "http://[::1"}}).encode(),
        b"[" * 100_000 + b"]" * 100_000,
        b"\xff\xfe not utf-8",
    ]
    answered = 0
    for request in requests:
        for tool in (STATUS_TOOL, PROVIDER_CONFIG_TOOL):
            done = subprocess.run(
                [sys.executable, "-m", "plugin_tools", tool],
                input=request,
                capture_output=True,
                env={**os.environ, "DELTA_MEM_MLX_ROOT": str(tmp_path / "root")},
                timeout=120,
            )
            assert done.returncode == 0 and b"Traceback" not in done.stderr, (request[:80], done.stderr[-500:])
            assert done.stdout.count(b"\n") == 1
            result = json.loads(done.stdout)
            assert isinstance(result, dict) and "internal error" not in result.get("problem", "")
            answered += 1
    record_figures(
        "plugin_hostile_calls",
        {
            "process_calls": answered,
            "process_calls_answered_with_one_json_object": answered,
            "in_process_calls_so_far": COUNTS["calls"],
            "in_process_problems": COUNTS["problems"],
            "internal_errors": COUNTS["internal_errors"],
        },
    )
