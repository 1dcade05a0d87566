"""A failed start-sidecar under launchd leaves no job behind to retry: the job is booted out and disabled."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fake_launchctl import launchctl_calls
from typer.testing import CliRunner

from common.ports import free_port
from installer.cli import app

runner = CliRunner()


def test_a_failed_start_boots_the_launchd_job_out(
    tmp_path: Path, fake_launchctl: Path, monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the plist goes to ~/Library/LaunchAgents
    root = tmp_path / "root"
    installed = runner.invoke(
        app,
        ["install-sidecar-only", "--root", str(root), "--preset", "custom", "--model-path", str(tiny_model_dir),
         "--model-id", "tiny", "--min-memory-gb", "1", "--port", str(free_port()), "--supervisor", "launchd",
         "--yes"],  # fmt: skip
    )
    assert installed.exit_code == 0, installed.output
    # The fake launchd "runs" the job, but nothing ever answers on the port.
    done = runner.invoke(app, ["start-sidecar", "--root", str(root), "--health-timeout", "1"])
    assert done.exit_code == 1
    assert "was not healthy within 1 s" in done.output and "nothing retries it in the background" in done.output
    verbs = [call[0] for call in launchctl_calls(fake_launchctl)]
    assert verbs[-2:] == ["bootout", "disable"], verbs
    state = json.loads((tmp_path / "launchctl.state").read_text())
    assert state["loaded"] == {}
