"""Every installer command via CliRunner; install → start → status → stop end to end on the tiny model."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from fake_commands import command_on_path
from typer.testing import CliRunner

from common.layout import RootLayout
from common.ports import free_port
from common.receipt import read_receipt, verify_receipt
from installer.cli import app
from sidecar.testing.tiny_model import write_tiny_adapter, write_tiny_model
from supervisors import supervisor_for_root

runner = CliRunner()

COMMANDS = [
    "doctor",
    "presets",
    "install-sidecar",
    "install-sidecar-only",
    "start-sidecar",
    "stop-sidecar",
    "restart-sidecar",
    "status",
    "logs",
    "uninstall",
    "selftest",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny model and adapter in local folders, as `--preset custom` takes them."""
    base = tmp_path_factory.mktemp("tiny")
    model = write_tiny_model(base / "model")
    return {"model": model, "adapter": write_tiny_adapter(base / "adapter", model)}


@pytest.fixture
def root(tmp_path: Path) -> Iterator[Path]:
    """An install root whose sidecar is stopped after the test, whatever happened."""
    path = tmp_path / "root"
    yield path
    supervisor_for_root(path).uninstall()


def _install(
    root: Path, tiny: dict[str, Path], command: str = "install-sidecar-only", *extra: str
) -> list[str]:
    return [
        command,
        "--root",
        str(root),
        "--preset",
        "custom",
        "--model-path",
        str(tiny["model"]),
        "--adapter-path",
        str(tiny["adapter"]),
        "--model-id",
        "tiny-e2e",
        "--min-memory-gb",
        "1",
        "--port",
        str(free_port()),
        "--supervisor",
        "process",
        *extra,
    ]


def _ok(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_examples(command: str) -> None:
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0
    assert "Examples:" in result.output and f"delta-mem-mlx {command}" in result.output


def test_python_dash_m_installer_runs_the_cli() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "installer", "presets", "--json"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert {p["name"] for p in json.loads(done.stdout)["presets"]} == {"custom", "qwen3-delta", "smoke"}


@pytest.mark.e2e
def test_install_start_status_stop_end_to_end(root: Path, tiny: dict[str, Path]) -> None:
    out = _ok(_install(root, tiny))
    assert "Installed, not started" in out and f"start-sidecar --root {root}" in out
    receipt = read_receipt(root)
    assert receipt is not None and receipt.supervisor == "process" and receipt.model_id == "tiny-e2e"
    assert verify_receipt(root) == []
    assert supervisor_for_root(root).status().state == "stopped"

    out = _ok(["start-sidecar", "--root", str(root)])
    assert "Healthy at http://127.0.0.1:" in out and "provider-config --apply" in out

    report = json.loads(_ok(["status", "--root", str(root), "--json"]))
    assert report["install"]["installed"] is True and report["install"]["preset"] == "custom"
    assert report["supervisor"]["kind"] == "process" and report["supervisor"]["state"] == "running"
    pid = report["supervisor"]["pid"]
    assert psutil.Process(pid).cmdline()[-4:] == ["installer", "serve", "--root", str(root)]
    assert report["health"]["problem"] is None and report["health"]["body"]["model"] == "tiny-e2e"
    assert report["ready"] is True and report["install"]["model_id"] == "tiny-e2e"
    assert report["install"]["adapter_path"] == str(RootLayout.of(root).adapter_dir(None))
    assert report["supervisor"]["uptime_s"] >= 0
    text = _ok(["status", "--root", str(root)])
    assert "process: running" in text and "ready" in text

    assert "Already running" in _ok(["start-sidecar", "--root", str(root)])
    out = _ok(["restart-sidecar", "--root", str(root)])
    assert "Healthy" in out
    assert supervisor_for_root(root).status().pid != pid

    logs = _ok(["logs", "--root", str(root), "-n", "5"])
    assert "sidecar.out.log" in logs and "sidecar.err.log" in logs

    out = _ok(["stop-sidecar", "--root", str(root)])
    assert "Stopped" in out
    assert json.loads(_ok(["status", "--root", str(root), "--json"]))["supervisor"]["state"] == "stopped"
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


@pytest.mark.e2e
def test_install_sidecar_starts_and_a_rerun_restarts(root: Path, tiny: dict[str, Path]) -> None:
    out = _ok(_install(root, tiny, "install-sidecar"))
    assert "The sidecar is healthy" in out and "Next: connect OpenClaw" in out
    first = supervisor_for_root(root).status()
    assert first.state == "running"
    port = json.loads(RootLayout.of(root).settings.read_text())["port"]
    args = _install(root, tiny, "install-sidecar")
    args[args.index("--port") + 1] = str(port)  # the running sidecar holds it: that is fine
    out = _ok(args)
    assert "held by this root's sidecar" in out
    again = supervisor_for_root(root).status()
    assert again.state == "running" and again.pid != first.pid
    assert verify_receipt(root) == []


def test_start_refuses_without_a_completed_install(root: Path) -> None:
    result = runner.invoke(app, ["start-sidecar", "--root", str(root)])
    assert result.exit_code == 1
    assert "cannot start" in result.output and "no completed install" in result.output
    assert "install-sidecar --root" in result.output


def test_start_refuses_when_an_installed_file_changed(root: Path, tiny: dict[str, Path]) -> None:
    _ok(_install(root, tiny))
    npz = RootLayout.of(root).adapter_dir(None) / "delta_mem_adapter_mlx.npz"
    data = bytearray(npz.read_bytes())
    data[100] ^= 0xFF
    npz.write_bytes(bytes(data))
    result = runner.invoke(app, ["start-sidecar", "--root", str(root)])
    assert result.exit_code == 1
    assert f"{npz} has changed since the install" in result.output
    assert supervisor_for_root(root).status().state == "stopped"


def test_a_failed_install_leaves_no_receipt_and_a_rerun_completes(
    root: Path, tiny: dict[str, Path], tmp_path: Path
) -> None:
    _ok(_install(root, tiny))
    broken = tmp_path / "broken-adapter"
    broken.mkdir()
    (broken / "delta_mem_config.json").write_text((tiny["adapter"] / "delta_mem_config.json").read_text())
    (broken / "delta_mem_adapter_mlx.npz").write_bytes(b"not an archive")
    args = _install(root, tiny)
    args[args.index("--adapter-path") + 1] = str(broken)
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1].startswith("Error: adapter:")
    assert "delta_mem_adapter_mlx.npz" in result.output
    assert read_receipt(root) is None
    _ok(_install(root, tiny))
    assert verify_receipt(root) == []


def test_start_sidecar_qmd_and_batching_flags_update_the_settings(
    root: Path, tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _ok(_install(root, tiny))
    qmd = command_on_path(monkeypatch, tmp_path / "bin", "qmd", "#!/bin/sh\necho '[]'\n")
    args = ["start-sidecar", "--root", str(root), "--attention-state-source", "qmd", "--qmd-mode", "search"]
    batching = ["--max-batch", "4", "--prefill-chunk", "128", "--no-share-prefix"]
    _ok([*args, "--qmd-limit", "3", "--qmd-timeout", "2.5", *batching, "--health-timeout", "120"])
    settings = json.loads(RootLayout.of(root).settings.read_text())
    assert settings["attention_state_source"] == "qmd"
    assert (settings["max_batch"], settings["prefill_chunk"], settings["share_prefix"]) == (4, 128, False)
    assert settings["qmd"] == {
        **settings["qmd"],
        "mode": "search",
        "limit": 3,
        "timeout": 2.5,
        "bin": str(qmd),
    }
    missing = runner.invoke(app, ["start-sidecar", "--root", str(root), "--qmd-bin", "qmd-not-there"])
    assert missing.exit_code == 1 and "QMD: 'qmd-not-there' not found" in missing.output
    too_big = runner.invoke(app, ["start-sidecar", "--root", str(root), "--max-batch", "1000"])
    assert too_big.exit_code == 1 and "max_batch must be in 1..64" in too_big.output
    assert json.loads(RootLayout.of(root).settings.read_text())["max_batch"] == 4


def test_install_refuses_a_custom_preset_without_a_model(root: Path) -> None:
    result = runner.invoke(app, ["install-sidecar", "--root", str(root), "--preset", "custom", "--yes"])
    assert result.exit_code == 1
    assert "--model-repo ID or --model-path DIR" in result.output
    assert not root.exists()


def test_uninstall_purge_needs_consent_and_an_install_root(
    root: Path, tiny: dict[str, Path], tmp_path: Path
) -> None:
    _ok(_install(root, tiny))
    refused = runner.invoke(app, ["uninstall", "--root", str(root), "--purge"])
    assert refused.exit_code == 1 and "pass --yes" in refused.output
    assert root.exists()
    stranger = tmp_path / "not-a-root"
    (stranger / "precious").mkdir(parents=True)
    kept = runner.invoke(app, ["uninstall", "--root", str(stranger), "--purge", "--yes"])
    assert kept.exit_code == 1 and "does not look like an install root" in kept.output
    assert (stranger / "precious").exists()
    out = _ok(["uninstall", "--root", str(root), "--purge", "--yes"])
    assert "Deleted" in out and not root.exists()
    assert tiny["model"].exists(), "a model used in place is not part of the root"


def test_status_and_logs_of_an_empty_root(root: Path) -> None:
    report = json.loads(_ok(["status", "--root", str(root), "--json"]))
    assert report["install"]["problems"][0].startswith(f"{root} has no completed install")
    # Nothing installed: the default address is asked (whatever may answer there on this machine).
    assert report["health"]["url"] == "http://127.0.0.1:8765/health" and report["ready"] is False
    assert report["supervisor"]["state"] in ("stopped", "not-installed")
    assert "sidecar.err.log" in _ok(["logs", "--root", str(root)])


def test_a_non_loopback_host_needs_an_api_key_before_anything_is_written(
    root: Path, tiny: dict[str, Path]
) -> None:
    args = _install(root, tiny)
    args[args.index("--port") :] = [
        "--port",
        str(free_port()),
        "--host",
        "0.0.0.0",
        "--supervisor",
        "process",
    ]
    refused = runner.invoke(app, args)
    assert refused.exit_code == 1 and "without an API key" in refused.output
    assert not root.exists()
    _ok([*args, "--api-key", "s3cret"])
    settings_file = RootLayout.of(root).settings
    assert json.loads(settings_file.read_text())["api_key"] == "s3cret"
    assert stat.S_IMODE(settings_file.stat().st_mode) == 0o600


@pytest.mark.e2e
def test_a_model_without_an_adapter_installs_and_starts(root: Path, tiny: dict[str, Path]) -> None:
    args = _install(root, tiny, "install-sidecar")
    del args[args.index("--adapter-path") : args.index("--adapter-path") + 2]
    out = _ok(args)
    assert "adapter: none (the sidecar serves the plain model)" in out
    report = json.loads(_ok(["status", "--root", str(root), "--json"]))
    assert report["install"]["adapter_path"] is None and report["ready"] is True
    assert json.loads(RootLayout.of(root).settings.read_text())["adapter_path"] is None
