"""Supervisors: the process one (pidfile + psutil), systemd --user (fake systemctl), the common parts."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from fake_commands import command_on_path

import supervisors
from supervisors import (
    SupervisorError,
    default_kind,
    make_supervisor,
    supervisor_for_root,
    tail_lines,
)
from supervisors import process as process_module
from supervisors.process import ProcessSupervisor
from supervisors.systemd import SystemdSupervisor, parse_last_exit, quote_arg

DEADLINE_S = 30.0


def _wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.fixture
def child_code(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Replace the supervised `serve` command by a small Python program the test chooses."""
    code = ["import signal; signal.pause()"]
    monkeypatch.setattr(process_module, "sidecar_command", lambda root: [sys.executable, "-c", code[0]])
    yield code


@pytest.fixture
def supervisor(tmp_path: Path, child_code: list[str]) -> Iterator[ProcessSupervisor]:
    sup = ProcessSupervisor(tmp_path / "root")
    yield sup
    sup.stop()


def test_start_status_stop(supervisor: ProcessSupervisor) -> None:
    supervisor.start()
    status = supervisor.status()
    assert (status.kind, status.state) == ("process", "running")
    record = json.loads(supervisor.layout.pidfile.read_text())
    assert record["pid"] == status.pid
    assert record["cmdline"] == psutil.Process(status.pid).cmdline()
    supervisor.start()  # already running: no second process
    assert supervisor.status().pid == status.pid
    supervisor.stop()
    assert not psutil.pid_exists(status.pid) or psutil.Process(status.pid).status() == psutil.STATUS_ZOMBIE
    assert not supervisor.layout.pidfile.exists()
    assert supervisor.status().to_dict() == {
        "kind": "process",
        "state": "stopped",
        "pid": None,
        "detail": "not running",
        "last_exit": None,
    }


def test_stale_pidfile_is_not_taken_for_the_sidecar(supervisor: ProcessSupervisor) -> None:
    supervisor.start()
    pid = supervisor.status().pid
    assert pid is not None
    record = json.loads(supervisor.layout.pidfile.read_text())
    psutil.Process(pid).kill()
    psutil.Process(pid).wait(timeout=DEADLINE_S)
    supervisor.layout.pidfile.write_text(json.dumps(record))  # left behind by a crash
    status = supervisor.status()
    assert status.state == "stopped" and "stale pidfile" in status.detail


def test_a_reused_pid_is_not_taken_for_the_sidecar_nor_killed(supervisor: ProcessSupervisor) -> None:
    me = psutil.Process()
    supervisor.layout.pidfile.parent.mkdir(parents=True, exist_ok=True)
    # Our own pid, alive, but started at another time with another command line.
    fake = {
        "pid": me.pid,
        "create_time": me.create_time() - 1000,
        "cmdline": ["python", "-m", "installer", "serve"],
    }
    supervisor.layout.pidfile.write_text(json.dumps(fake))
    assert supervisor.status().state == "stopped"
    supervisor.stop()
    assert me.is_running()
    fake["create_time"] = me.create_time()  # right start time, wrong command line
    supervisor.layout.pidfile.write_text(json.dumps(fake))
    assert supervisor.running_process() is None


def test_garbage_pidfile_means_stopped(supervisor: ProcessSupervisor) -> None:
    supervisor.layout.pidfile.parent.mkdir(parents=True)
    supervisor.layout.pidfile.write_text("not json")
    assert supervisor.status().state == "stopped"


def test_a_crashed_sidecar_shows_as_stopped(supervisor: ProcessSupervisor, child_code: list[str]) -> None:
    child_code[0] = "import sys; sys.exit(3)"
    supervisor.start()
    keeper = supervisor.status().pid
    # Stopped because it crashed, not because it never started: the status names the exit and the keeper.
    _wait_for(lambda: "exited with status 3" in supervisor.status().detail, "the child to exit")
    status = supervisor.status()
    assert (status.state, status.pid) == ("stopped", keeper) and keeper is not None


def test_stop_kills_a_sidecar_that_ignores_sigterm(
    supervisor: ProcessSupervisor, child_code: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ready = tmp_path / "ready"
    child_code[0] = (
        "import signal, pathlib; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        f"pathlib.Path({str(ready)!r}).touch(); signal.pause()"
    )
    monkeypatch.setattr(process_module, "STOP_TIMEOUT_S", 0.5)
    supervisor.start()
    pid = supervisor.status().pid
    _wait_for(ready.exists, "the child to ignore SIGTERM")
    supervisor.stop()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_output_goes_to_the_root_logs(supervisor: ProcessSupervisor, child_code: list[str]) -> None:
    # The child stays up: one that exits is restarted, and the keeper's own line about it would follow.
    child_code[0] = (
        "import signal, sys; print('to stdout', flush=True); print('to stderr', file=sys.stderr, flush=True); "
        "signal.pause()"
    )
    supervisor.start()
    out_log, err_log = supervisor.log_paths()
    _wait_for(lambda: tail_lines(err_log, 1) == ["to stderr"], "stderr in the log")
    _wait_for(lambda: tail_lines(out_log, 1) == ["to stdout"], "stdout in the log")
    assert out_log.parent == supervisor.layout.root / "logs"


def test_logs_are_rotated_at_start_when_too_big(
    supervisor: ProcessSupervisor, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(supervisors, "LOG_MAX_BYTES", 100)
    out_log, _ = supervisor.log_paths()
    out_log.parent.mkdir(parents=True)
    out_log.write_text("x" * 200)
    supervisor.start()
    rotated = out_log.with_name(out_log.name + ".1")
    assert rotated.read_text() == "x" * 200
    assert not out_log.exists() or out_log.stat().st_size < 100


def test_tail_lines(tmp_path: Path) -> None:
    log = tmp_path / "log"
    log.write_text("".join(f"line {i}\n" for i in range(1000)))
    assert tail_lines(log, 2) == ["line 998", "line 999"]
    assert tail_lines(tmp_path / "missing", 5) == []


# --------------------------------------------------------------------------- systemd

FAKE_SYSTEMCTL = f"""#!{sys.executable}
import json, os, sys
with open(os.environ["FAKE_SYSTEMCTL_LOG"], "a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\\n")
if "show" in sys.argv:
    print("ActiveState=active\\nSubState=running\\nMainPID=777\\nResult=success")
"""


@pytest.fixture
def fake_systemctl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    command_on_path(monkeypatch, tmp_path / "bin", "systemctl", FAKE_SYSTEMCTL)
    log = tmp_path / "systemctl.log"
    monkeypatch.setenv("FAKE_SYSTEMCTL_LOG", str(log))
    return log


def _systemctl_calls(log: Path) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_systemd_unit_and_calls(tmp_path: Path, fake_systemctl: Path) -> None:
    root = tmp_path / "a root with 100% odd $chars"
    sup = SystemdSupervisor(root, unit_dir=tmp_path / "units")
    sup.install()
    unit = sup.unit_path.read_text()
    assert sup.unit_path.name.startswith("delta-mem-mlx-") and sup.unit_path.suffix == ".service"
    assert f'ExecStart={quote_arg(sys.executable)} "-m" "installer" "serve" "--root"' in unit
    assert "100%% odd $$chars" in unit
    assert "\nRestart=always\n" in unit and "RestartPreventExitStatus=78" in unit and "WantedBy=default.target" in unit
    assert f"StandardError=append:{root / 'logs' / 'sidecar.err.log'}" in unit
    sup.start()
    status = sup.status()
    assert (status.kind, status.state, status.pid) == ("systemd", "running", 777)
    sup.stop()
    sup.uninstall()
    assert not sup.unit_path.exists()
    verbs = [call[1] for call in _systemctl_calls(fake_systemctl)]
    assert verbs == ["daemon-reload", "enable", "start", "show", "stop", "stop", "disable", "daemon-reload"]
    assert all(call[0] == "--user" for call in _systemctl_calls(fake_systemctl))


def test_systemd_last_exit_from_show() -> None:
    killed = {"ExecMainCode": "2", "ExecMainStatus": "15", "NRestarts": "3", "ExecMainExitTimestamp": "Mon 2026-12-07"}
    exit = parse_last_exit(killed)
    assert exit is not None and (exit.description, exit.signal, exit.code) == ("was killed by SIGTERM", "SIGTERM", None)
    assert (exit.time, exit.restarts) == ("Mon 2026-12-07", 3)
    exited = parse_last_exit({"ExecMainCode": "1", "ExecMainStatus": "78", "NRestarts": "0"})
    assert exited is not None and (exited.code, exited.signal, exited.restarts) == (78, None, 0)
    assert parse_last_exit({"ExecMainCode": "0", "ExecMainStatus": "0"}) is None  # running, never ended


def test_quote_arg() -> None:
    assert quote_arg('a "b" \\c') == '"a \\"b\\" \\\\c"'


# --------------------------------------------------------------------------- choosing a supervisor


def test_default_kind_per_platform(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(supervisors.platform, "system", lambda: "Darwin")
    assert default_kind() == "launchd"
    monkeypatch.setattr(supervisors.platform, "system", lambda: "Linux")
    monkeypatch.setattr(supervisors, "systemd_user_available", lambda: False)
    assert default_kind() == "process"
    monkeypatch.setattr(supervisors, "systemd_user_available", lambda: True)
    assert default_kind() == "systemd"


def test_supervisor_for_root_without_receipt_uses_the_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(supervisors, "default_kind", lambda: "process")
    assert supervisor_for_root(tmp_path).kind == "process"


def test_unknown_kind_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SupervisorError, match="unknown supervisor 'cron'"):
        make_supervisor("cron", tmp_path)
