"""The root lock and the keeper's own lock: one command, and one keeper, per root at a time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from common.exit_codes import CONFIG_ERROR
from common.settings import SidecarSettings, save_settings
from supervisors.keeper import keeper_command, keeper_lock_path
from supervisors.root_lock import RootBusyError, hold_root, lock_path
from supervisors.systemd import SystemdSupervisor

DEADLINE_S = 60.0

HOLD = """
import sys, time
from pathlib import Path
from supervisors.root_lock import hold_root
with hold_root(Path(sys.argv[1]), "delta-mem-mlx start-sidecar"):
    print("held", flush=True)
    time.sleep(600)
"""


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A root with something installed in it (settings), which is what the lock protects."""
    save_settings(tmp_path / "root", SidecarSettings(model_path="/m", model_id="m"))
    return tmp_path / "root"


def test_a_second_command_is_refused_at_once_naming_the_holder(root: Path) -> None:
    with hold_root(root, "delta-mem-mlx install-sidecar"):
        with pytest.raises(RootBusyError) as refused:
            with hold_root(root, "delta-mem-mlx uninstall"):
                pytest.fail("two holders at once")
    message = refused.value.describe()
    holder = f"pid {os.getpid()} (delta-mem-mlx install-sidecar, since "
    assert message.startswith(f"root busy: {root} is being changed by {holder}")
    with hold_root(root, "delta-mem-mlx uninstall"):
        pass  # free again once the first block ended
    assert lock_path(root).read_bytes() == b""


def test_the_lock_of_a_killed_holder_is_free_at_once(root: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(root)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(RootBusyError, match=f"pid {holder.pid} \\(delta-mem-mlx start-sidecar"):
            with hold_root(root, "delta-mem-mlx stop-sidecar"):
                pass
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=DEADLINE_S)
        with hold_root(root, "delta-mem-mlx stop-sidecar"):
            pass
    finally:
        holder.kill()
        holder.wait()


def test_a_folder_with_nothing_installed_is_not_written_into(tmp_path: Path) -> None:
    stranger = tmp_path / "documents"
    stranger.mkdir()
    with hold_root(stranger, "delta-mem-mlx stop-sidecar"):
        pass
    assert list(stranger.iterdir()) == []
    with hold_root(tmp_path / "new", "delta-mem-mlx install-sidecar", create=True):
        assert lock_path(tmp_path / "new").exists()


def test_a_root_renamed_away_while_locking_is_not_locked_twice(root: Path, tmp_path: Path) -> None:
    # The purge renames the root aside while it holds the lock; a command that opened the old
    # file meanwhile must not think it holds the lock of the path's new occupant.
    with hold_root(root, "delta-mem-mlx uninstall"):
        os.replace(root, tmp_path / ".root.deleting")
        save_settings(root, SidecarSettings(model_path="/m", model_id="m"))
        with hold_root(root, "delta-mem-mlx install-sidecar"):
            assert json.loads(lock_path(root).read_text())["command"] == "delta-mem-mlx install-sidecar"


CHILD = """
import os, sys, pathlib
here = pathlib.Path(sys.argv[1])
with open(here / "starts", "a") as starts:
    starts.write(f"{os.getpid()}\\n")
code = int((here / "code").read_text())
if code:
    sys.exit(code)
import signal
signal.pause()
"""


def _children_of(folder: Path) -> list[int]:
    """Live processes running CHILD for `folder` (keepers name it in their argv too, after `--`)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if cmdline[1:2] == ["-c"] and str(folder) in cmdline:
            found.append(process.pid)
    return found


def _starts(folder: Path) -> list[str]:
    path = folder / "starts"
    return path.read_text().split() if path.exists() else []


def test_concurrent_keepers_of_one_pidfile_leave_exactly_one(tmp_path: Path) -> None:
    folder = tmp_path / "child"
    folder.mkdir()
    (folder / "code").write_text("0")
    pidfile = tmp_path / "run" / "sidecar.pid.json"
    argv = keeper_command([sys.executable, "-c", CHILD, str(folder)], tmp_path / "run" / "keeper.json", 0.3, pidfile)
    keepers = [subprocess.Popen(argv, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    try:
        deadline = time.monotonic() + DEADLINE_S
        while sum(k.poll() is not None for k in keepers) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        winners = [k for k in keepers if k.poll() is None]
        losers = [k for k in keepers if k.poll() is not None]
        assert len(winners) == 1 and len(losers) == 3
        # The winner writes its record and starts its child in its own time: wait for both.
        deadline = time.monotonic() + DEADLINE_S
        while not (pidfile.exists() and _starts(folder)):
            assert time.monotonic() < deadline, "the remaining keeper never wrote its record and started"
            time.sleep(0.05)
        record = json.loads(pidfile.read_text())
        assert record["pid"] == winners[0].pid
        assert record["create_time"] == pytest.approx(psutil.Process(winners[0].pid).create_time(), abs=0.01)
        # Children never exit here (they wait for a signal) and a keeper starts one before it could
        # exit: the live children are every child ever started, whether or not it has written its pid.
        assert len(_children_of(folder)) == 1 and _children_of(folder) == [int(pid) for pid in _starts(folder)]
        said = [k.communicate(timeout=DEADLINE_S)[1] for k in losers]  # bounded: a child may hold the pipe
        assert [k.returncode for k in losers] == [0, 0, 0] and all("another keeper already keeps" in s for s in said)
    finally:
        for keeper in keepers:
            keeper.terminate()
            keeper.wait(timeout=DEADLINE_S)
    assert keeper_lock_path(pidfile).exists()


def test_a_configuration_error_is_not_restarted(tmp_path: Path) -> None:
    folder = tmp_path / "child"
    folder.mkdir()
    (folder / "code").write_text(str(CONFIG_ERROR))
    state = tmp_path / "keeper.json"
    keeper = subprocess.run(
        keeper_command([sys.executable, "-c", CHILD, str(folder)], state, 0.2),
        capture_output=True, text=True, timeout=DEADLINE_S,
    )  # fmt: skip
    assert keeper.returncode == 1
    assert len(_starts(folder)) == 1
    record = json.loads(state.read_text())
    assert record["state"] == "gave-up" and record["returncode"] == CONFIG_ERROR
    assert "its configuration is wrong; a restart cannot fix it" in record["last_exit"]
    assert "does not start it again" in keeper.stderr


def test_systemd_does_not_restart_a_configuration_error(tmp_path: Path) -> None:
    unit = SystemdSupervisor(tmp_path / "root", unit_dir=tmp_path / "units").unit_text()
    assert f"RestartPreventExitStatus={CONFIG_ERROR}" in unit.splitlines()

