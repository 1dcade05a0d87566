"""The process supervisor's keeper: restarts after any exit but a stop, throttles, gives up, stops cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from supervisors import process as process_module
from supervisors import tail_lines
from supervisors.keeper import (
    MAX_QUICK_CRASHES,
    RestartPolicy,
    describe_exit,
    keeper_command,
    last_exit_of,
)
from supervisors.process import ProcessSupervisor, live_children

DEADLINE_S = 30.0

# The supervised program, a shell script (it starts in milliseconds, where Python takes a good part of
# a second on a loaded machine): appends its pid to `starts`, then does what `behaviour` says
# (the `-once` behaviours only on the first start).
CHILD = """
echo $$ >> "$1/starts"
first=$([ "$(wc -l < "$1/starts")" -eq 1 ] && echo yes)
case "$(cat "$1/behaviour")" in
    crash) exit 3 ;;
    exit0-once) [ "$first" ] && exit 0 ;;
    sigterm-self-once) [ "$first" ] && kill -TERM $$ ;;
esac
exec sleep 100000
"""
# A crash this long after its start is quick: a hundred times what the child above lives when it crashes.
QUICK_THROTTLE_S = 1.5


def child_command(folder: Path) -> list[str]:
    return ["/bin/sh", "-c", CHILD, "child", str(folder)]


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class Child:
    """The files through which a test steers the supervised program and sees its starts."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir()
        self.behaviour("run")

    def behaviour(self, name: str) -> None:
        (self.folder / "behaviour").write_text(name)

    def starts(self) -> list[int]:
        path = self.folder / "starts"
        return [int(line) for line in path.read_text().split()] if path.exists() else []


@pytest.fixture
def child(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Child:
    steer = Child(tmp_path / "child")
    monkeypatch.setattr(process_module, "sidecar_command", lambda root: child_command(steer.folder))
    monkeypatch.setattr(process_module, "RESTART_THROTTLE_S", 0.3)
    return steer


@pytest.fixture
def supervisor(tmp_path: Path, child: Child) -> Iterator[ProcessSupervisor]:
    sup = ProcessSupervisor(tmp_path / "root")
    yield sup
    sup.stop()


def keeper_of(supervisor: ProcessSupervisor) -> psutil.Process:
    process = supervisor.running_process()
    assert process is not None
    return process


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_sidecar_is_started_again(supervisor: ProcessSupervisor, child: Child, signum: int) -> None:
    supervisor.start()
    keeper = keeper_of(supervisor)
    wait_for(lambda: len(child.starts()) == 1, "the first start")
    first = child.starts()[0]
    assert [c.pid for c in live_children(keeper)] == [first]
    assert supervisor.status().state == "running" and supervisor.status().pid == keeper.pid
    assert supervisor.status().last_exit is None
    os.kill(first, signum)
    wait_for(lambda: len(child.starts()) == 2, "the restart")
    second = child.starts()[1]
    assert second != first
    wait_for(lambda: [c.pid for c in live_children(keeper)] == [second], "the new sidecar")
    name = signal.Signals(signum).name
    wait_for(lambda: supervisor.status().state == "running", "the keeper to say it runs again")
    status = supervisor.status()
    assert status.last_exit is not None
    assert (status.last_exit.signal, status.last_exit.code, status.last_exit.restarts) == (name, None, 1)
    assert f"the sidecar last was killed by {name} at 20" in status.detail and "restarted 1 time " in status.detail
    assert any(f"the sidecar was killed by {name}" in line for line in tail_lines(supervisor.log_paths()[1], 20))
    supervisor.stop()
    assert not psutil.pid_exists(second) or psutil.Process(second).status() == psutil.STATUS_ZOMBIE
    assert not supervisor.layout.pidfile.exists() and not supervisor.keeper_state_file.exists()


def test_quick_crashes_are_counted_until_the_keeper_gives_up() -> None:
    policy = RestartPolicy(throttle_s=10.0, max_quick_crashes=3)
    assert policy.after_crash(0, 0.25) == (1, 9.75)  # waits out the rest of the throttle
    assert policy.after_crash(1, 9.99) == (2, pytest.approx(0.01))
    assert policy.after_crash(2, 1.0) == (3, None)  # the third quick crash in a row: give up
    # A run as long as the throttle is not a quick crash: the count starts again, the restart is at once.
    assert policy.after_crash(2, 10.0) == (0, 0.0)
    assert policy.after_crash(0, 3600.0) == (0, 0.0)


def test_a_crash_loop_backs_off_then_gives_up(
    supervisor: ProcessSupervisor, child: Child, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(process_module, "RESTART_THROTTLE_S", QUICK_THROTTLE_S)
    child.behaviour("crash")
    supervisor.start()
    keeper = keeper_of(supervisor)
    assert keeper.wait(timeout=DEADLINE_S) == 1
    assert len(child.starts()) == MAX_QUICK_CRASHES
    status = supervisor.status()
    assert status.state == "stopped" and "gave up" in status.detail and "exited with status 3" in status.detail
    log = "\n".join(tail_lines(supervisor.log_paths()[1], 50))
    assert log.count("starting it again in") == MAX_QUICK_CRASHES - 1
    assert "the keeper gives up" in log and "delta-mem-mlx start-sidecar" in log
    # Fixed, started again: the stale verdict is gone.
    child.behaviour("run")
    supervisor.start()
    wait_for(lambda: len(child.starts()) == MAX_QUICK_CRASHES + 1, "the new start")
    assert supervisor.status().state == "running"


@pytest.mark.parametrize(
    ("behaviour", "said"), [("exit0-once", "exited with status 0"), ("sigterm-self-once", "was killed by SIGTERM")]
)
def test_an_exit_nobody_asked_for_is_restarted(
    supervisor: ProcessSupervisor, child: Child, behaviour: str, said: str
) -> None:
    child.behaviour(behaviour)
    supervisor.start()
    wait_for(lambda: len(child.starts()) == 2, "the restart after an exit the keeper did not ask for")
    wait_for(lambda: supervisor.status().state == "running", "the keeper to say it runs again")
    status = supervisor.status()
    assert status.last_exit is not None and status.last_exit.description == said
    assert status.last_exit.restarts == 1
    assert [c.pid for c in live_children(keeper_of(supervisor))] == [child.starts()[1]]


def test_while_waiting_to_restart_status_says_so_and_stop_is_prompt(
    supervisor: ProcessSupervisor, child: Child, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(process_module, "RESTART_THROTTLE_S", 600.0)
    child.behaviour("crash")
    supervisor.start()
    keeper = keeper_of(supervisor)
    wait_for(lambda: supervisor.keeper_state_file.exists(), "the keeper to wait for a restart")
    record = json.loads(supervisor.keeper_state_file.read_text())
    assert record["state"] == "restarting" and record["last_exit"] == "exited with status 3"
    assert record["returncode"] == 3 and record["restarts"] == 0
    waiting = supervisor.status()
    assert (waiting.state, waiting.pid) == ("stopped", keeper.pid)
    assert "exited with status 3" in waiting.detail and "starts it again shortly" in waiting.detail
    # A keeper that did not stop at once would sit out the 600 s throttle (the wait is shorter).
    keeper.terminate()
    assert keeper.wait(timeout=DEADLINE_S) == 0
    assert len(child.starts()) == 1
    assert not supervisor.keeper_state_file.exists()


def test_start_replaces_a_keeper_that_waits_to_restart(
    supervisor: ProcessSupervisor, child: Child, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(process_module, "RESTART_THROTTLE_S", 600.0)
    child.behaviour("crash")
    supervisor.start()
    old_keeper = keeper_of(supervisor)
    wait_for(lambda: supervisor.keeper_state_file.exists(), "the keeper to wait for a restart")
    child.behaviour("run")
    supervisor.start()
    assert not old_keeper.is_running()
    wait_for(lambda: len(child.starts()) == 2, "the sidecar to start now")
    assert supervisor.status().state == "running" and keeper_of(supervisor).pid != old_keeper.pid


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_the_sidecar_dies_with_a_killed_keeper(supervisor: ProcessSupervisor, child: Child) -> None:
    supervisor.start()
    keeper = keeper_of(supervisor)
    wait_for(lambda: len(child.starts()) == 1, "the first start")
    sidecar = psutil.Process(child.starts()[0])
    keeper.kill()
    wait_for(lambda: not sidecar.is_running() or sidecar.status() == psutil.STATUS_ZOMBIE, "the orphan to exit")


def test_keeper_runs_directly_and_forwards_sigterm(tmp_path: Path) -> None:
    steer = Child(tmp_path / "child")
    state = tmp_path / "keeper.json"
    argv = keeper_command(child_command(steer.folder), state, throttle_s=0.3)
    keeper = subprocess.Popen(argv, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: len(steer.starts()) == 1, "the start")
        keeper.send_signal(signal.SIGTERM)
        assert keeper.wait(timeout=DEADLINE_S) == 0
    finally:
        if keeper.poll() is None:
            keeper.kill()
            keeper.wait()
    sidecar = steer.starts()[0]
    assert not psutil.pid_exists(sidecar) or psutil.Process(sidecar).status() == psutil.STATUS_ZOMBIE
    assert not state.exists()


def test_exit_descriptions() -> None:
    assert describe_exit(3) == "exited with status 3"
    assert describe_exit(-signal.SIGKILL) == "was killed by SIGKILL"
    assert describe_exit(78) == "exited with status 78 (its configuration is wrong; a restart cannot fix it)"
    exit = last_exit_of(-signal.SIGTERM, 0.0, 2)
    assert (exit.signal, exit.code, exit.time, exit.restarts) == ("SIGTERM", None, "1970-01-01T00:00:00Z", 2)
    assert exit.text() == "was killed by SIGTERM at 1970-01-01T00:00:00Z; restarted 2 times since start-sidecar"
    assert (last_exit_of(0, 0.0, 0).code, last_exit_of(0, 0.0, 0).signal) == (0, None)

