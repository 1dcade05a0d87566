"""`--supervisor openclaw`: nothing installed or started here, a provider block whose localService starts
`serve --root`, and a sidecar started that way seen by `status` and unloading its model when idle."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from server_process import wait_until
from typer.testing import CliRunner

from common.layout import RootLayout
from common.load_time import DEFAULT_READY_TIMEOUT_S, read_load_time, record_load_time
from common.ports import free_port
from common.receipt import read_receipt
from common.settings import load_settings
from installer.cli import app
from plugin_tools.payloads import PROVIDER_ID
from sidecar.testing.tiny_model import write_tiny_adapter, write_tiny_model
from supervisors import supervisor_for_root

runner = CliRunner()
MODEL_ID = "tiny-openclaw"
DEADLINE_S = 180.0


@pytest.fixture(scope="module")
def weighty(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A generated model with ~50 MB of float32 weights (big enough to see in RSS), and its adapter."""
    base = tmp_path_factory.mktemp("weighty")
    model = write_tiny_model(
        base / "model", hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=4, head_dim=64,
        intermediate_size=1536,
    )
    return {"model": model, "adapter": write_tiny_adapter(base / "adapter", model)}


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """HOME in a temp dir, where a LaunchAgent or a systemd unit would be written."""
    path = tmp_path / "home"
    path.mkdir()
    monkeypatch.setenv("HOME", str(path))
    return path


@pytest.fixture
def root(tmp_path: Path) -> Iterator[Path]:
    """An install root; a sidecar of it still running after the test is stopped."""
    path = tmp_path / "root"
    yield path
    supervisor_for_root(path).uninstall()


def _ok(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.output


def _install(root: Path, model: dict[str, Path], *extra: str) -> str:
    return _ok([
        "install-sidecar", "--root", str(root), "--preset", "custom", "--model-path", str(model["model"]),
        "--adapter-path", str(model["adapter"]), "--model-id", MODEL_ID, "--min-memory-gb", "1",
        "--port", str(free_port()), "--supervisor", "openclaw", "--yes", *extra,
    ])


def _block(root: Path, *extra: str) -> dict:
    payload = json.loads(_ok(["provider-config", "--json", "--root", str(root), *extra]))
    return payload["config_patch"]["models"]["providers"][PROVIDER_ID]


def test_install_for_openclaw_installs_and_starts_nothing(root: Path, home: Path, weighty: dict[str, Path]) -> None:
    out = _install(root, weighty, "--keep-alive", "90s")
    assert "Installed for OpenClaw, not started" in out and "provider-config --apply" in out
    receipt = read_receipt(root)
    assert receipt is not None and receipt.supervisor == "openclaw"
    settings = load_settings(root)
    assert settings.keep_alive_s == 90
    assert not (home / "Library" / "LaunchAgents").exists()
    assert not (home / ".config" / "systemd").exists()
    assert not RootLayout.of(root).pidfile.exists()
    assert supervisor_for_root(root).status().state == "stopped"
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{settings.port}/ready", timeout=2)


def test_start_sidecar_on_an_openclaw_root_says_what_to_do_instead(root: Path, weighty: dict[str, Path]) -> None:
    _install(root, weighty)
    for command in ("start-sidecar", "restart-sidecar"):
        result = runner.invoke(app, [command, "--root", str(root)])
        assert result.exit_code != 0
        assert "started by OpenClaw" in result.output and "provider-config --apply" in result.output
    assert supervisor_for_root(root).status().state == "stopped"


def test_the_provider_block_starts_serve_with_absolute_paths(root: Path, weighty: dict[str, Path]) -> None:
    _install(root, weighty)
    settings = load_settings(root)
    service = _block(root)["localService"]
    assert Path(service["command"]).is_absolute() and os.access(service["command"], os.X_OK)
    assert service["command"] == os.path.abspath(sys.executable)  # the venv's python, its link not resolved
    assert service["args"] == ["-m", "installer", "serve", "--root", str(root), "--log-to-root"]
    assert service["cwd"] == str(root)
    assert "PATH" not in service["env"] and service["env"]["HF_HUB_OFFLINE"] == "1"
    assert service["healthUrl"] == f"http://127.0.0.1:{settings.port}/ready"
    assert service["readyTimeoutMs"] == DEFAULT_READY_TIMEOUT_S * 1000  # nothing measured yet
    assert service["idleStopMs"] == 30 * 60 * 1000

    assert _block(root, "--idle-stop", "2m")["localService"]["idleStopMs"] == 120_000
    assert _block(root, "--idle-stop", "never")["localService"]["idleStopMs"] == 0
    record_load_time(root, ready_s=40.0, load_s=25.0)
    assert _block(root)["localService"]["readyTimeoutMs"] == 120_000  # 3 × the measured start


def test_idle_stop_is_refused_for_a_root_openclaw_does_not_start(tmp_path: Path, weighty: dict[str, Path]) -> None:
    root = tmp_path / "root"
    _ok([
        "install-sidecar-only", "--root", str(root), "--preset", "custom", "--model-path", str(weighty["model"]),
        "--adapter-path", str(weighty["adapter"]), "--model-id", MODEL_ID, "--min-memory-gb", "1",
        "--port", str(free_port()), "--supervisor", "process", "--yes",
    ])
    assert "localService" not in _block(root)
    result = runner.invoke(app, ["provider-config", "--json", "--root", str(root), "--idle-stop", "5m"])
    assert result.exit_code != 0 and "--supervisor openclaw" in result.output


def _start_as_openclaw_does(root: Path) -> subprocess.Popen[bytes]:
    """Run the provider block's localService command, as OpenClaw spawns it (output piped, then dropped)."""
    service = _block(root)["localService"]
    return subprocess.Popen(
        [service["command"], *service["args"]], cwd=service["cwd"], env={**os.environ, **service["env"]},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def _health(port: int) -> dict:
    try:
        response = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
    except httpx.TransportError:
        return {}
    return response.json() if response.status_code == 200 else {}


def _turn(port: int, messages: list[dict[str, str]]) -> dict:
    response = httpx.post(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        json={"model": MODEL_ID, "messages": messages, "max_tokens": 4, "temperature": 0},
        headers={"X-Session-Affinity": "idle-test"}, timeout=120,
    )
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.e2e
def test_a_sidecar_started_as_openclaw_does_unloads_when_idle_and_comes_back_warm(
    root: Path, weighty: dict[str, Path]
) -> None:
    _install(root, weighty, "--keep-alive", "3s")
    port = load_settings(root).port
    process = _start_as_openclaw_does(root)
    try:
        wait_until(lambda: _health(port).get("model_state") == "loaded", "the sidecar's first load", DEADLINE_S)
        report = json.loads(_ok(["status", "--root", str(root), "--json"]))
        assert report["supervisor"]["kind"] == "openclaw" and report["supervisor"]["state"] == "running"
        assert report["supervisor"]["pid"] == process.pid and "started by OpenClaw" in report["supervisor"]["detail"]
        measured = read_load_time(root)
        assert measured is not None and measured.ready_s >= measured.load_s > 0

        history = [{"role": "system", "content": "You keep notes. " * 40}, {"role": "user", "content": "Hi!"}]
        first = _turn(port, history)
        loaded_rss = psutil.Process(process.pid).memory_info().rss
        wait_until(lambda: _health(port).get("model_state") == "unloaded", "the idle unload", DEADLINE_S)
        unloaded_rss = psutil.Process(process.pid).memory_info().rss
        assert unloaded_rss < loaded_rss, (unloaded_rss, loaded_rss)
        shown = _ok(["status", "--root", str(root)])
        assert "unloaded: the next request loads it" in shown and "openclaw: running" in shown

        history += [{"role": "assistant", "content": first["choices"][0]["message"]["content"]},
                    {"role": "user", "content": "And now?"}]
        second = _turn(port, history)
        usage = second["usage"]
        assert usage["prompt_tokens_details"]["cached_tokens"] >= first["usage"]["prompt_tokens"] * 0.95, usage
        assert _health(port)["model_loads"] == 2

        log = RootLayout.of(root).stderr_log.read_text(encoding="utf-8", errors="replace")
        assert "model tiny-openclaw unloaded" in log and "loaded again in" in log  # --log-to-root kept the log
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)


@pytest.mark.e2e
def test_a_supervised_sidecar_that_unloaded_stays_healthy_and_is_not_restarted(
    root: Path, weighty: dict[str, Path]
) -> None:
    # The keeper's path (launchd and systemd read the same /health): an unloaded model is healthy.
    _ok([
        "install-sidecar", "--root", str(root), "--preset", "custom", "--model-path", str(weighty["model"]),
        "--adapter-path", str(weighty["adapter"]), "--model-id", MODEL_ID, "--min-memory-gb", "1",
        "--port", str(free_port()), "--supervisor", "process", "--keep-alive", "1s", "--yes",
    ])  # fmt: skip
    port = load_settings(root).port
    pid = supervisor_for_root(root).status().pid
    _turn(port, [{"role": "user", "content": "Hi!"}])
    wait_until(lambda: _health(port).get("model_state") == "unloaded", "the idle unload", DEADLINE_S)
    again = _ok(["start-sidecar", "--root", str(root)])
    assert "Already running" in again and "Healthy at" in again
    status = supervisor_for_root(root).status()
    assert status.state == "running" and status.pid == pid  # nothing restarted it
