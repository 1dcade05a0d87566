"""Races and refusals on one install root, with real CLI processes and the process supervisor.

- N `start-sidecar` at once leave exactly one keeper and one sidecar; the others are refused,
  naming the command that holds the root; `status` and `stop-sidecar` agree with what runs.
- `install-sidecar-only`, `start-sidecar` and `uninstall --purge` at once end in a state that
  `status` describes truly: a purged root has no keeper left running for it.
- A taken port is named with its holder before anything starts, and a sidecar that exits because
  of its port or its configuration is not retried behind the user's back.
- A sidecar of the root that its supervisor did not start is never reported as stopped.
- A stray SIGTERM to the supervised sidecar does not stop it for good: the keeper starts it again,
  `status` says it was killed by SIGTERM, and only `stop-sidecar` stops it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from reliability import record_figures
from typer.testing import CliRunner

from common.exit_codes import CONFIG_ERROR, PORT_IN_USE
from common.health import probe_health
from common.layout import RootLayout
from common.ports import free_port
from common.settings import load_settings
from installer.cli import app
from supervisors import process as process_module
from supervisors import supervisor_for_root
from supervisors.port_owner import listener_pid

pytestmark = pytest.mark.e2e

runner = CliRunner()
DEADLINE_S = 240.0
CONCURRENT_STARTS = 4
# The holder is named by pid, unless it is caught in the moment between taking the lock and saying who it is.
BUSY = " is being changed by "


@pytest.fixture
def tiny(tiny_model_dir: Path, tiny_adapter_dir: Path) -> dict[str, Path]:
    return {"model": tiny_model_dir, "adapter": tiny_adapter_dir}


def install_args(root: Path, tiny: dict[str, Path], port: int) -> list[str]:
    return [
        "install-sidecar-only", "--root", str(root), "--preset", "custom",
        "--model-path", str(tiny["model"]), "--adapter-path", str(tiny["adapter"]),
        "--model-id", "tiny-race", "--min-memory-gb", "1", "--port", str(port),
        "--supervisor", "process", "--yes",
    ]  # fmt: skip


@pytest.fixture
def root(tmp_path: Path, tiny: dict[str, Path]) -> Iterator[Path]:
    """An installed (not started) root; whatever runs for it is stopped afterwards."""
    path = tmp_path / "root"
    done = runner.invoke(app, install_args(path, tiny, free_port()))
    assert done.exit_code == 0, done.output
    yield path
    for process in keepers(path) + sidecars(path):
        process.kill()
    supervisor_for_root(path).uninstall()


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline() if process.status() != psutil.STATUS_ZOMBIE else []
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []


def keepers(root: Path) -> list[psutil.Process]:
    """Live keeper processes of this root (found by their state file, which every keeper is given)."""
    state_file = str(RootLayout.of(root).pidfile.with_name("keeper.json"))
    return [p for p in psutil.process_iter() if "supervisors.keeper" in _cmdline(p) and state_file in _cmdline(p)]


def sidecars(root: Path) -> list[psutil.Process]:
    """Live `serve --root <root>` processes."""
    wanted = ["serve", "--root", str(RootLayout.of(root).root)]
    found = []
    for process in psutil.process_iter():
        argv = _cmdline(process)
        if "supervisors.keeper" not in argv and any(argv[i : i + 3] == wanted for i in range(len(argv))):
            found.append(process)
    return found


# Each CLI process imports everything, says it is ready, then waits at a FIFO: opening it for reading
# blocks until the test opens the other end, which releases them all within the same moment.
AT_THE_GATE = """
import os, sys
from installer.cli import app
open(f"{sys.argv[1]}.ready.{os.getpid()}", "w").close()
os.close(os.open(sys.argv[1], os.O_RDONLY))
app(args=sys.argv[2:], prog_name="delta-mem-mlx")
"""


def at_once(gate_dir: Path, commands: list[list[str]]) -> list[tuple[int, str]]:
    """Run the real CLI commands in their own processes, released at the same moment; (status, output) each."""
    gate = gate_dir / "gate"
    os.mkfifo(gate)
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", AT_THE_GATE, str(gate), *command],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for command in commands
    ]
    deadline = time.monotonic() + DEADLINE_S
    while len(list(gate_dir.glob("gate.ready.*"))) < len(commands):
        assert time.monotonic() < deadline and all(p.poll() is None for p in processes), "a command died early"
        time.sleep(0.02)
    opened = os.open(gate, os.O_RDWR)  # kept open until all are done, so that none can miss it
    try:
        return [(p.wait(timeout=DEADLINE_S), p.stdout.read() if p.stdout else "") for p in processes]
    finally:
        os.close(opened)
        gate.unlink()
        for ready in gate_dir.glob("gate.ready.*"):
            ready.unlink()


def status(root: Path) -> dict[str, Any]:
    done = runner.invoke(app, ["status", "--root", str(root), "--json"])
    assert done.exit_code == 0, done.output
    return json.loads(done.output)


def assert_consistent(root: Path) -> str:
    """`status` says what really runs: 'running' with one keeper and a ready sidecar, or nothing at all."""
    report = status(root)
    state, ready = report["supervisor"]["state"], report["health"]["problem"] is None
    if state == "running":
        assert len(keepers(root)) == 1 and len(sidecars(root)) == 1, report["supervisor"]
        assert ready, report["health"]
    else:
        assert state == "stopped" and not ready, (report["supervisor"], report["health"])
        assert keepers(root) == [] and sidecars(root) == []
    return state


def test_concurrent_starts_leave_one_keeper_and_a_true_status(root: Path, tmp_path: Path) -> None:
    outcomes = at_once(tmp_path, [["start-sidecar", "--root", str(root)]] * CONCURRENT_STARTS)
    started = [out for code, out in outcomes if code == 0]
    refused = [out for code, out in outcomes if code == 1 and BUSY in out]
    assert len(started) + len(refused) == CONCURRENT_STARTS, outcomes
    assert started and all("Healthy at" in out for out in started)
    kept = len(keepers(root))
    assert kept == 1 and len(sidecars(root)) == 1
    assert assert_consistent(root) == "running"
    # A second round mixing every command that changes the root.
    mixed = ["start-sidecar", "restart-sidecar", "stop-sidecar", "start-sidecar"]
    second = at_once(tmp_path, [[command, "--root", str(root)] for command in mixed])
    failed = [(command, out) for command, (code, out) in zip(mixed, second, strict=True) if code and BUSY not in out]
    assert failed == []
    final = assert_consistent(root)
    stopped = runner.invoke(app, ["stop-sidecar", "--root", str(root)])
    assert stopped.exit_code == 0, stopped.output
    assert keepers(root) == [] and sidecars(root) == []
    assert assert_consistent(root) == "stopped"
    record_figures(
        "root_start_race",
        {
            "concurrent_starts": CONCURRENT_STARTS,
            "started": len(started),
            "refused": len(refused),
            "refused_naming_the_holder": sum(f"{BUSY}pid " in out and "start-sidecar" in out for out in refused),
            "keepers_after_the_starts": kept,
            "mixed_round": [[command, code] for command, (code, _) in zip(mixed, second, strict=True)],
            "mixed_round_final_state": final,
            "keepers_after_stop": 0,
        },
    )


def test_install_start_and_purge_at_once_end_in_a_true_state(
    root: Path, tiny: dict[str, Path], tmp_path: Path
) -> None:
    port = load_settings(root).port
    commands = [
        install_args(root, tiny, port),
        ["start-sidecar", "--root", str(root)],
        ["uninstall", "--purge", "--yes", "--root", str(root)],
    ]
    outcomes = at_once(tmp_path, commands)
    for code, out in outcomes:
        assert code == 0 or BUSY in out or "no completed install" in out, outcomes
    assert "Traceback" not in "".join(out for _, out in outcomes)
    if root.exists():
        assert_consistent(root)
    else:
        assert keepers(root) == [] and sidecars(root) == [], "a purged root must not keep a sidecar running"
    assert not list(root.parent.glob(f".{root.name}.deleting-*"))


def test_a_taken_port_is_named_and_nothing_is_left_running(root: Path) -> None:
    settings = load_settings(root)
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind((settings.host, settings.port))
        squatter.listen()
        done = runner.invoke(app, ["start-sidecar", "--root", str(root)])
    assert done.exit_code == 1
    assert f"{settings.host}:{settings.port} is taken by pid {os.getpid()}" in done.output
    assert "nothing was started" in done.output
    assert keepers(root) == [] and sidecars(root) == []
    assert not RootLayout.of(root).pidfile.exists()


@pytest.mark.parametrize(
    ("status_code", "said"),
    [(PORT_IN_USE, "its port or its state dir is in use"), (CONFIG_ERROR, "its configuration is wrong")],
)
def test_a_sidecar_exiting_for_its_port_or_config_is_not_retried_behind_the_users_back(
    root: Path, monkeypatch: pytest.MonkeyPatch, status_code: int, said: str
) -> None:
    fake = f"import sys; print('serve: the reason, in one line', file=sys.stderr); sys.exit({status_code})"
    monkeypatch.setattr(process_module, "sidecar_command", lambda _root: [sys.executable, "-c", fake])
    monkeypatch.setattr(process_module, "RESTART_THROTTLE_S", 0.2)
    # The start looks for the keeper only every 3 s, so a keeper that gave up at once is gone by then.
    monkeypatch.setattr(process_module, "_STARTUP_POLL_S", 3.0)
    done = runner.invoke(app, ["start-sidecar", "--root", str(root), "--health-timeout", "60"])
    assert done.exit_code == 1
    assert f"exited with status {status_code} ({said}" in done.output
    assert "its last log line: serve: the reason, in one line" in done.output
    assert "nothing retries it in the background" in done.output
    # No keeper is left that could start it again.
    assert keepers(root) == [] and not RootLayout.of(root).pidfile.exists()


def test_a_sidecar_its_supervisor_did_not_start_is_never_called_stopped(root: Path) -> None:
    settings = load_settings(root)
    foreground = subprocess.Popen(
        [sys.executable, "-m", "installer", "serve", "--root", str(root)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + DEADLINE_S
        while status(root)["health"]["problem"] is not None:
            assert foreground.poll() is None and time.monotonic() < deadline, "serve did not become healthy"
            time.sleep(0.2)
        supervisor = status(root)["supervisor"]
        assert supervisor["state"] == "unsupervised" and supervisor["pid"] == foreground.pid
        assert "stop-sidecar cannot stop it" in supervisor["detail"]
        stop = runner.invoke(app, ["stop-sidecar", "--root", str(root)])
        assert stop.exit_code == 1
        assert f"still answers with this root's model: pid {foreground.pid}" in stop.output
        assert foreground.poll() is None
        text = runner.invoke(app, ["status", "--root", str(root)]).output
        assert "supervisor  process: unsupervised" in text
        assert settings.model_id in text
    finally:
        foreground.terminate()
        foreground.wait(timeout=60)


def test_a_stray_sigterm_to_the_sidecar_is_restarted_and_only_stop_sidecar_stops_it(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(process_module, "RESTART_THROTTLE_S", 1.0)
    started = runner.invoke(app, ["start-sidecar", "--root", str(root)])
    assert started.exit_code == 0, started.output
    [first] = sidecars(root)
    first.send_signal(signal.SIGTERM)
    settings = load_settings(root)
    deadline = time.monotonic() + DEADLINE_S
    while True:
        serving = [p.pid for p in sidecars(root)]
        if serving and serving != [first.pid] and probe_health(settings).ready:
            break
        assert time.monotonic() < deadline, f"no new sidecar answered /health (status: {status(root)['supervisor']})"
        time.sleep(0.2)
    assert listener_pid(settings.port) == serving[0] != first.pid
    supervisor = status(root)["supervisor"]
    assert supervisor["state"] == "running", supervisor
    assert supervisor["last_exit"]["signal"] == "SIGTERM" and supervisor["last_exit"]["restarts"] == 1
    assert supervisor["last_exit"]["description"] == "was killed by SIGTERM"
    assert "last exit   was killed by SIGTERM at " in runner.invoke(app, ["status", "--root", str(root)]).output

    stopped = runner.invoke(app, ["stop-sidecar", "--root", str(root)])
    assert stopped.exit_code == 0, stopped.output
    assert keepers(root) == [] and sidecars(root) == []
    report = status(root)
    assert report["supervisor"]["state"] == "stopped" and report["health"]["problem"] is not None
