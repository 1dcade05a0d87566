"""launchd supervision, on Linux, against a fake `launchctl` on PATH that records its argv."""

from __future__ import annotations

import os
import plistlib
import stat
import sys
from pathlib import Path

import pytest
from fake_launchctl import UID, fail_next, launchctl_calls
from typer.testing import CliRunner

from common.receipt import new_receipt, write_receipt
from installer.cli import app
from supervisors import LastExit, sidecar_command, supervisor_for_root
from supervisors.launchd import LaunchctlError, LaunchdSupervisor, parse_last_exit, parse_print

runner = CliRunner()


def _supervisor(tmp_path: Path) -> LaunchdSupervisor:
    return LaunchdSupervisor(tmp_path / "root", agents_dir=tmp_path / "LaunchAgents", uid=UID)


def test_plist_round_trips_with_the_expected_keys(tmp_path: Path) -> None:
    supervisor = _supervisor(tmp_path)
    supervisor.install()
    assert supervisor.plist_path.name == f"{supervisor.label}.plist"
    assert stat.S_IMODE(supervisor.plist_path.stat().st_mode) == 0o644
    with supervisor.plist_path.open("rb") as handle:
        plist = plistlib.load(handle)
    assert plist == supervisor.plist()
    root = tmp_path / "root"
    assert plist["Label"].startswith("ai.openclaw.delta-mem-mlx.")
    assert plist["ProgramArguments"] == [sys.executable, "-m", "installer", "serve", "--root", str(root)]
    assert plist["ProgramArguments"] == sidecar_command(root)
    assert plist["RunAtLoad"] is True and plist["KeepAlive"] is True
    assert plist["ThrottleInterval"] == 10
    assert plist["ProcessType"] == "Interactive"
    assert plist["WorkingDirectory"] == str(root)
    assert plist["StandardOutPath"] == str(root / "logs" / "sidecar.out.log")
    assert plist["StandardErrorPath"] == str(root / "logs" / "sidecar.err.log")
    assert plist["EnvironmentVariables"]["HF_HUB_OFFLINE"] == "1"
    assert plist["EnvironmentVariables"]["PATH"] == os.environ["PATH"]


def test_two_roots_get_two_labels(tmp_path: Path) -> None:
    a = LaunchdSupervisor(tmp_path / "a", agents_dir=tmp_path, uid=UID)
    b = LaunchdSupervisor(tmp_path / "b", agents_dir=tmp_path, uid=UID)
    assert a.label != b.label


def test_start_runs_bootout_enable_bootstrap_kickstart_in_order(tmp_path: Path, fake_launchctl: Path) -> None:
    supervisor = _supervisor(tmp_path)
    supervisor.install()
    supervisor.start()
    target = f"gui/{UID}/{supervisor.label}"
    assert launchctl_calls(fake_launchctl) == [
        ["print", target],  # start checks whether it already runs
        ["bootout", target],
        ["enable", target],
        ["bootstrap", f"gui/{UID}", str(supervisor.plist_path)],
        ["kickstart", "-k", target],
    ]
    status = supervisor.status()
    assert (status.kind, status.state, status.pid) == ("launchd", "running", 4242)
    assert "last exit code (never exited)" in status.detail


def test_start_is_a_no_op_when_running_and_restart_reloads(tmp_path: Path, fake_launchctl: Path) -> None:
    supervisor = _supervisor(tmp_path)
    supervisor.start()  # installs the plist itself when missing
    fake_launchctl.unlink()
    supervisor.start()
    assert [call[0] for call in launchctl_calls(fake_launchctl)] == ["print"]
    fake_launchctl.unlink()
    supervisor.restart()
    assert [call[0] for call in launchctl_calls(fake_launchctl)] == ["bootout", "enable", "bootstrap", "kickstart"]


def test_stop_boots_out_and_disables(tmp_path: Path, fake_launchctl: Path) -> None:
    supervisor = _supervisor(tmp_path)
    supervisor.start()
    fake_launchctl.unlink()
    supervisor.stop()
    target = f"gui/{UID}/{supervisor.label}"
    assert launchctl_calls(fake_launchctl) == [["bootout", target], ["disable", target]]
    assert supervisor.status().state == "stopped"
    assert supervisor.plist_path.exists()


def test_uninstall_removes_the_plist(tmp_path: Path, fake_launchctl: Path) -> None:
    supervisor = _supervisor(tmp_path)
    supervisor.start()
    supervisor.uninstall()
    assert not supervisor.plist_path.exists()
    assert supervisor.status().state == "not-installed"
    assert launchctl_calls(fake_launchctl)[-1] == ["bootout", f"gui/{UID}/{supervisor.label}"]


def test_bootout_in_progress_waits_until_the_job_is_gone(tmp_path: Path, fake_launchctl: Path) -> None:
    supervisor = _supervisor(tmp_path)
    supervisor.start()
    fake_launchctl.unlink()
    fail_next(tmp_path, "bootout", 36, "Boot-out failed: 36: Operation now in progress")
    supervisor.restart()
    # The fake still shows the job to the first print after the 36, and not to the second.
    verbs = [call[0] for call in launchctl_calls(fake_launchctl)]
    assert verbs == ["bootout", "print", "print", "enable", "bootstrap", "kickstart"]
    assert supervisor.status().state == "running"


def test_a_failing_launchctl_call_raises_with_code_and_output(tmp_path: Path, fake_launchctl: Path) -> None:
    supervisor = _supervisor(tmp_path)
    fail_next(tmp_path, "bootstrap", 5, "Bootstrap failed: 5: Input/output error")
    with pytest.raises(
        LaunchctlError, match="bootstrap .* failed with exit code 5: Bootstrap failed"
    ) as info:
        supervisor.restart()
    assert info.value.returncode == 5


def test_parse_print_reads_only_the_jobs_own_fields() -> None:
    output = "\n".join(
        [
            "gui/501/x = {",
            "\tendpoints = {",
            "\t\tstate = active",
            "\t\tpid = 1",
            "\t}",
            "\tstate = not running",
            "\tlast exit code = 78: EX_CONFIG",
            "}",
        ]
    )
    assert parse_print(output) == {"state": "not running", "last exit code": "78: EX_CONFIG"}


def test_the_last_exit_is_read_from_launchctl_print() -> None:
    killed = parse_print("gui/501/x = {\n\truns = 4\n\tlast terminating signal = Terminated: 15\n}")
    assert parse_last_exit(killed) == LastExit("was killed by SIGTERM", None, "SIGTERM", None, 3)
    config = parse_last_exit({"last exit code": "78: EX_CONFIG", "runs": "1"})
    assert config is not None and (config.code, config.signal, config.restarts) == (78, None, 0)
    assert parse_last_exit({"last exit code": "(never exited)"}) is None


def test_cli_commands_drive_launchd_from_the_receipt(
    tmp_path: Path, fake_launchctl: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    root = tmp_path / "root"
    root.mkdir()
    receipt = new_receipt(
        root,
        preset="smoke",
        model_id="m",
        model_source="x",
        adapter_source=None,
        model_path=root,
        adapter_path=None,
        supervisor="launchd",
        files=[],
    )
    write_receipt(root, receipt)
    supervisor = supervisor_for_root(root)
    assert isinstance(supervisor, LaunchdSupervisor)
    assert (
        supervisor.plist_path == tmp_path / "home" / "Library" / "LaunchAgents" / f"{supervisor.label}.plist"
    )
    stopped = runner.invoke(app, ["stop-sidecar", "--root", str(root)])
    assert stopped.exit_code == 0, stopped.output
    uninstalled = runner.invoke(app, ["uninstall", "--root", str(root)])
    assert uninstalled.exit_code == 0, uninstalled.output
    assert ["bootout", supervisor.target] in launchctl_calls(fake_launchctl)
