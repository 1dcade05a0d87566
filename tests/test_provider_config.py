"""The provider block and its merge into openclaw.json (JSON and JSON5), through the library and the CLI."""

from __future__ import annotations

import json
import os
import stat
from datetime import datetime, timezone
from pathlib import Path

import json5
import pytest
from typer.testing import CliRunner

from common.kv_budget import GIB
from common.settings import SidecarSettings, save_settings
from installer.cli import app
from installer.openclaw_config import (
    OpenClawConfigError,
    apply_patch,
    merge_patch,
    openclaw_config_path,
)
from plugin_tools.payloads import PROVIDER_ID, ConfigPatch
from plugin_tools.provider_config import (
    HIDDEN_API_KEY,
    LOCAL_API_KEY,
    ProviderConfigError,
    build_provider_config,
    check_params,
    timeout_seconds,
)
from plugin_tools.target import TargetError, api_base_url
from presets.catalog import load_preset

USER_CONFIG_JSON5 = """\
// My OpenClaw setup: keep these comments in the backup.
{
  gateway: { port: 19999, mode: "local" },
  agents: {
    defaults: {
      workspace: "~/my-workspace",
      model: { primary: "other-local/llama", fallbacks: ["other-local/qwen"] },
      models: {
        "other-local/llama": { alias: "llama" },  // trailing commas too
      },
    },
  },
  models: {
    providers: {
      "other-local": {
        baseUrl: "http://127.0.0.1:4000/v1",
        apiKey: "sk-local",
        api: "openai-completions",
        models: [{ id: "llama", name: "Llama" }, { id: "qwen", name: "Qwen" }],
      },
    },
  },
}
"""


@pytest.fixture()
def installed_root(tmp_path: Path) -> Path:
    """A root whose settings say: port 8799, model id tiny-test, 20000-token window, a 512-token answer."""
    root = tmp_path / "root"
    settings = SidecarSettings(
        model_path=str(tmp_path / "model"),
        model_id="tiny-test",
        port=8799,
        context_window=20000,
        max_output_tokens=512,
    )
    save_settings(root, settings)
    return root


def _patch(model_id: str = "m1") -> ConfigPatch:
    return build_provider_config({}, {"modelId": model_id})["config_patch"]


def test_block_has_what_openclaw_needs_and_no_static_session_header() -> None:
    payload = build_provider_config({}, {})
    block = payload["config_patch"]["models"]["providers"][PROVIDER_ID]
    model = block["models"][0]
    assert block["api"] == "openai-completions"
    assert block["baseUrl"].endswith("/v1")
    assert block["apiKey"] == LOCAL_API_KEY
    assert block["timeoutSeconds"] >= 300
    assert model["contextWindow"] >= 16000
    assert model["cost"] == {"input": 0, "output": 0, "cacheRead": 0, "cacheWrite": 0}
    assert model["compat"]["sendSessionAffinityHeaders"] is True
    assert model["compat"]["supportsUsageInStreaming"] is True
    assert model["compat"]["supportsTools"] is True
    assert model["compat"]["maxTokensField"] == "max_completion_tokens"
    assert "headers" not in block and "headers" not in model
    assert "x-openclaw-session-key" not in json.dumps(payload).lower()
    defaults = payload["config_patch"]["agents"]["defaults"]
    assert defaults["model"]["primary"] == payload["model_ref"] == f"{PROVIDER_ID}/{model['id']}"
    assert defaults["models"][payload["model_ref"]] == {"alias": payload["alias"]}


@pytest.mark.parametrize(("ram_gb", "window"), [(16, 65536), (64, 262144)])
def test_defaults_before_install_come_from_the_default_preset(monkeypatch, ram_gb: int, window: int) -> None:
    # The window an install would announce on this machine: 8-bit KV holds 65,536 tokens in a 16 GB
    # Mac's budget; 64 GB holds the model's whole 262,144 in float.
    monkeypatch.setattr("presets.memory_plan.machine_ram", lambda: ram_gb * GIB)
    preset = load_preset("qwen3-delta")
    payload = build_provider_config({}, {})
    model = payload["config_patch"]["models"]["providers"][PROVIDER_ID]["models"][0]
    assert model["id"] == preset.model_id
    assert model["contextWindow"] == window
    assert model["maxTokens"] == preset.max_output_tokens
    assert "qwen3-delta" in payload["defaults_from"]


def test_defaults_come_from_the_installed_root(installed_root: Path) -> None:
    payload = build_provider_config({"sidecarRoot": str(installed_root)}, {})
    block = payload["config_patch"]["models"]["providers"][PROVIDER_ID]
    assert block["baseUrl"] == "http://127.0.0.1:8799/v1"
    assert block["models"][0]["id"] == "tiny-test"
    assert block["models"][0]["contextWindow"] == 20000
    assert block["models"][0]["maxTokens"] == 512
    assert payload["notes"] == []
    assert str(installed_root) in payload["defaults_from"]


def test_parameters_override_the_install_and_mismatches_are_noted(installed_root: Path) -> None:
    params = check_params({"baseUrl": "http://localhost:9000/", "modelId": "other", "contextWindow": 65536})
    payload = build_provider_config({"sidecarRoot": str(installed_root)}, params)
    block = payload["config_patch"]["models"]["providers"][PROVIDER_ID]
    assert block["baseUrl"] == "http://localhost:9000/v1"
    assert block["models"][0]["id"] == "other"
    assert any("404" in note for note in payload["notes"])
    assert any("larger than the sidecar's 20000" in note for note in payload["notes"])


def test_api_key_is_hidden_from_the_agent_and_written_by_apply(tmp_path: Path) -> None:
    root = tmp_path / "root"
    save_settings(root, SidecarSettings(model_path="/m", model_id="k", api_key="s3cret"))
    hidden = build_provider_config({"sidecarRoot": str(root)}, {})
    revealed = build_provider_config({"sidecarRoot": str(root)}, {}, reveal_api_key=True)
    assert "s3cret" not in json.dumps(hidden)
    assert hidden["config_patch"]["models"]["providers"][PROVIDER_ID]["apiKey"] == HIDDEN_API_KEY
    assert revealed["config_patch"]["models"]["providers"][PROVIDER_ID]["apiKey"] == "s3cret"


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"contextWindow": 8192}, "below OpenClaw's minimum of 16000"),
        ({"contextWindow": 16000, "maxTokens": 16000}, "must be smaller than the context window"),
        ({"maxTokens": 0}, "positive integer"),
    ],
)
def test_values_openclaw_would_refuse_are_refused(params: dict[str, int], message: str) -> None:
    with pytest.raises(ProviderConfigError, match=message):
        build_provider_config({}, check_params(dict(params)))


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"base_url": "http://x"}, "unknown parameter"),
        ({"modelId": 3}, "non-empty string"),
        ({"contextWindow": True}, "positive integer"),
        ({"contextWindow": "32768"}, "positive integer"),
    ],
)
def test_bad_tool_parameters_are_refused(params: dict[str, object], message: str) -> None:
    with pytest.raises(ProviderConfigError, match=message):
        check_params(params)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://127.0.0.1:8765", "http://127.0.0.1:8765/v1"),
        ("http://127.0.0.1:8765/", "http://127.0.0.1:8765/v1"),
        ("http://127.0.0.1:8765/v1/", "http://127.0.0.1:8765/v1"),
        ("https://mac.local/proxy", "https://mac.local/proxy/v1"),
        ("http://[::1]:8765/v1", "http://[::1]:8765/v1"),
    ],
)
def test_base_urls_are_normalised_to_v1(url: str, expected: str) -> None:
    assert api_base_url(url) == expected


@pytest.mark.parametrize("url", ["127.0.0.1:8765", "ftp://host/v1", "http://:80", "http://host:99999/v1"])
def test_bad_base_urls_are_refused(url: str) -> None:
    with pytest.raises(TargetError):
        api_base_url(url)


def test_timeout_covers_long_prefills() -> None:
    assert timeout_seconds(16000, 256) == 300
    assert timeout_seconds(131072, 8192) > timeout_seconds(32768, 4096) > 300


def test_merge_keeps_every_user_key_and_replaces_only_the_default_model() -> None:
    user = json5.loads(USER_CONFIG_JSON5)
    merged, previous = merge_patch(user, _patch(), set_default=True)
    assert previous == "other-local/llama"
    assert merged["gateway"] == user["gateway"]
    assert merged["agents"]["defaults"]["workspace"] == "~/my-workspace"
    expected_model = {"primary": "delta-mem-mlx/m1", "fallbacks": ["other-local/qwen"]}
    assert merged["agents"]["defaults"]["model"] == expected_model
    assert merged["agents"]["defaults"]["models"]["other-local/llama"] == {"alias": "llama"}
    assert merged["agents"]["defaults"]["models"]["delta-mem-mlx/m1"] == {"alias": "delta-mem"}
    assert merged["models"]["providers"]["other-local"] == user["models"]["providers"]["other-local"]
    assert merged["models"]["providers"][PROVIDER_ID]["models"][0]["id"] == "m1"
    assert user["agents"]["defaults"]["model"]["primary"] == "other-local/llama", "the input must not change"


def test_merge_replaces_an_old_delta_mem_provider_and_keeps_per_model_params() -> None:
    old_provider = {"baseUrl": "http://old/v1", "headers": {"X-OpenClaw-Session-Key": "s"}}
    per_model = {"delta-mem-mlx/m1": {"params": {"temperature": 0.2}}}
    user = {
        "models": {"mode": "replace", "providers": {PROVIDER_ID: old_provider}},
        "agents": {"defaults": {"model": "openai/gpt", "models": per_model}},
    }
    merged, previous = merge_patch(user, _patch(), set_default=True)
    provider = merged["models"]["providers"][PROVIDER_ID]
    assert "headers" not in provider and provider["baseUrl"].endswith(":8765/v1")
    assert merged["models"]["mode"] == "replace"
    assert merged["agents"]["defaults"]["model"] == {"primary": "delta-mem-mlx/m1"}
    assert previous == "openai/gpt"
    expected_entry = {"params": {"temperature": 0.2}, "alias": "delta-mem"}
    assert merged["agents"]["defaults"]["models"]["delta-mem-mlx/m1"] == expected_entry


def test_merge_without_default_leaves_the_default_model_alone() -> None:
    user = {"agents": {"defaults": {"model": "openai/gpt"}}}
    merged, previous = merge_patch(user, _patch(), set_default=False)
    assert merged["agents"]["defaults"]["model"] == "openai/gpt"
    assert previous is None


def test_merge_refuses_a_section_of_the_wrong_type() -> None:
    with pytest.raises(OpenClawConfigError, match="models.providers in openclaw.json is a list"):
        merge_patch({"models": {"providers": []}}, _patch(), set_default=True)


def test_apply_over_json5_keeps_a_byte_exact_backup(tmp_path: Path) -> None:
    path = tmp_path / "openclaw.json"
    path.write_text(USER_CONFIG_JSON5, encoding="utf-8")
    os.chmod(path, 0o640)
    now = datetime(2026, 9, 6, 12, 30, 5, tzinfo=timezone.utc)
    result = apply_patch(path, _patch(), now=now)
    assert result.comments_dropped and not result.created
    assert result.backup == tmp_path / "openclaw.json.bak-20260906T123005Z"
    assert result.backup.read_bytes() == USER_CONFIG_JSON5.encode("utf-8")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    written = json.loads(path.read_text(encoding="utf-8"))
    assert written["gateway"] == {"port": 19999, "mode": "local"}
    assert written["agents"]["defaults"]["model"]["primary"] == "delta-mem-mlx/m1"
    # A second apply in the same second keeps the first backup and writes another: the file it saves
    # is the already merged one, not the original.
    merged = path.read_bytes()
    second = apply_patch(path, _patch(), now=now)
    assert second.backup == tmp_path / "openclaw.json.bak-20260906T123005Z-2"
    assert second.backup.read_bytes() == merged != result.backup.read_bytes()
    assert result.backup.read_bytes() == USER_CONFIG_JSON5.encode("utf-8")


def test_apply_over_plain_json_says_nothing_is_lost(tmp_path: Path) -> None:
    path = tmp_path / "openclaw.json"
    path.write_text(json.dumps({"gateway": {"port": 1}}), encoding="utf-8")
    result = apply_patch(path, _patch())
    assert not result.comments_dropped
    assert json.loads(path.read_text(encoding="utf-8"))["gateway"] == {"port": 1}


def test_apply_creates_a_missing_file_readable_by_its_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "fresh" / "openclaw.json"
    result = apply_patch(path, _patch())
    assert result.created and result.backup is None
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    written = json.loads(path.read_text(encoding="utf-8"))
    assert written["models"]["providers"][PROVIDER_ID]["api"] == "openai-completions"


def test_apply_writes_through_a_symlinked_config(tmp_path: Path) -> None:
    target = tmp_path / "real.json"
    target.write_text("{}", encoding="utf-8")
    link = tmp_path / "openclaw.json"
    link.symlink_to(target)
    apply_patch(link, _patch())
    assert link.is_symlink()
    assert PROVIDER_ID in json.loads(target.read_text(encoding="utf-8"))["models"]["providers"]


@pytest.mark.parametrize(
    "content",
    [b"{ models: { providers: ", b"[1, 2]", b"\xff\xfe not utf-8", b"", b'{"models": {"providers": "nope"}}'],
)
def test_apply_refuses_a_file_it_cannot_use_and_changes_nothing(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "openclaw.json"
    path.write_bytes(content)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(OpenClawConfigError, match="openclaw.json"):
        apply_patch(path, _patch())
    assert path.read_bytes() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_config_path_follows_openclaw_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("OPENCLAW_CONFIG_PATH", "OPENCLAW_STATE_DIR", "OPENCLAW_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert openclaw_config_path() == tmp_path / "home" / ".openclaw" / "openclaw.json"
    monkeypatch.setenv("OPENCLAW_HOME", str(tmp_path / "oc-home"))
    assert openclaw_config_path() == tmp_path / "oc-home" / ".openclaw" / "openclaw.json"
    monkeypatch.setenv("OPENCLAW_STATE_DIR", str(tmp_path / "state"))
    assert openclaw_config_path() == tmp_path / "state" / "openclaw.json"
    monkeypatch.setenv("OPENCLAW_CONFIG_PATH", str(tmp_path / "explicit.json"))
    assert openclaw_config_path() == tmp_path / "explicit.json"


def test_cli_prints_the_block(installed_root: Path) -> None:
    result = CliRunner().invoke(app, ["provider-config", "--root", str(installed_root)])
    assert result.exit_code == 0, result.output
    body = "\n".join(line for line in result.output.splitlines() if not line.startswith("#"))
    assert json.loads(body)["models"]["providers"][PROVIDER_ID]["baseUrl"] == "http://127.0.0.1:8799/v1"


def test_cli_json_prints_the_payload(installed_root: Path) -> None:
    args = ["provider-config", "--json", "--root", str(installed_root), "--model-id", "x"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["model_ref"] == "delta-mem-mlx/x"


def test_cli_apply_merges_and_reports(installed_root: Path, tmp_path: Path) -> None:
    config = tmp_path / "openclaw.json"
    config.write_text(USER_CONFIG_JSON5, encoding="utf-8")
    args = ["provider-config", "--apply", "--config", str(config), "--root", str(installed_root)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "JSON5" in result.output and ".bak-" in result.output and "other-local/llama" in result.output
    written = json.loads(config.read_text(encoding="utf-8"))
    assert written["agents"]["defaults"]["model"]["primary"] == "delta-mem-mlx/tiny-test"
    assert written["gateway"]["port"] == 19999


def test_cli_apply_json_without_default(installed_root: Path, tmp_path: Path) -> None:
    config = tmp_path / "openclaw.json"
    result = CliRunner().invoke(
        app,
        ["provider-config", "--apply", "--json", "--no-set-default", "--config", str(config)]
        + ["--root", str(installed_root)],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["created"] is True and report["default_model_set"] is False
    assert "model" not in json.loads(config.read_text(encoding="utf-8"))["agents"]["defaults"]


def test_cli_refuses_an_unparsable_config_with_one_line(tmp_path: Path) -> None:
    config = tmp_path / "openclaw.json"
    config.write_text("{ broken", encoding="utf-8")
    result = CliRunner().invoke(app, ["provider-config", "--apply", "--config", str(config)])
    assert result.exit_code == 1
    assert result.output.strip().startswith("Error: ")
    assert "nothing was changed" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert config.read_text(encoding="utf-8") == "{ broken"


def test_cli_refuses_a_small_context_window_with_one_line() -> None:
    result = CliRunner().invoke(app, ["provider-config", "--context-window", "4096"])
    assert result.exit_code == 1
    assert "Error: " in result.output and "16000" in result.output
