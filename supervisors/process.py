"""The fallback supervisor: a detached keeper process that runs the sidecar, and a pidfile.

The keeper (supervisors/keeper.py) starts the sidecar again whenever it exits (a crash, a kill, a
stray SIGTERM), throttled like launchd, and stops it for good only on its own SIGTERM (stop-sidecar).
The keeper writes the pidfile itself, once it holds the lock that lets only one keeper run per root:
its pid, start time and command line, so a stale pidfile or a pid reused by another program is never
taken for it, and a second keeper started at the same moment exits instead of fighting the first one
for the port.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from common.files import read_regular_file
from supervisors import (
    STOP_TIMEOUT_S,
    LastExit,
    Supervisor,
    SupervisorError,
    SupervisorStatus,
    sidecar_command,
    sidecar_environment,
)
from supervisors.keeper import THROTTLE_S, keeper_command, last_exit_of

# Least seconds between two starts of a crashing sidecar (a module constant so tests can shorten it).
RESTART_THROTTLE_S = THROTTLE_S
# How long a new keeper may take to start Python and record itself (a loaded machine is slow).
KEEPER_STARTUP_S = 60.0
_STARTUP_POLL_S = 0.05
# The pidfile and the keeper's state are a few hundred bytes.
_MAX_RECORD_BYTES = 64 * 1024


class ProcessSupervisorError(SupervisorError):
    """The background process could not be started or stopped."""


class ProcessSupervisor(Supervisor):
    """A detached keeper running `serve`, with a pidfile under the root."""

    kind = "process"

    @property
    def keeper_state_file(self) -> Path:
        """Where the keeper says that it waits to restart the sidecar, or gave up."""
        return self.layout.pidfile.with_name("keeper.json")

    def install(self) -> None:
        """Nothing to register: just make the folders the process needs."""
        self.layout.pidfile.parent.mkdir(parents=True, exist_ok=True)
        self.prepare_logs()

    def is_installed(self) -> bool:
        """Always true: a plain process needs no registration."""
        return True

    def start(self) -> None:
        """Spawn the keeper in its own session with its output (and the sidecar's) in the root's logs.

        Returns once the keeper has recorded itself in the pidfile, or once it found another keeper
        of this root already running and left. A keeper that is waiting to restart a crashed
        sidecar is replaced, so the sidecar starts now.
        """
        if self.running_process() is not None:
            if self.status().state == "running":
                return
            self.stop()
        self.install()
        self.keeper_state_file.unlink(missing_ok=True)
        command = keeper_command(
            sidecar_command(self.layout.root), self.keeper_state_file, RESTART_THROTTLE_S, self.layout.pidfile
        )
        out_path, err_path = self.log_paths()
        with out_path.open("ab") as out, err_path.open("ab") as err:
            child = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                cwd=self.layout.root,
                env={**os.environ, **sidecar_environment()},
                start_new_session=True,  # outlives the CLI and its terminal
                close_fds=True,
            )
        self._wait_for_keeper(child, err_path)

    def _wait_for_keeper(self, child: subprocess.Popen[bytes], err_path: Path) -> None:
        deadline = time.monotonic() + KEEPER_STARTUP_S
        while time.monotonic() < deadline:
            keeper = self.running_process()
            if keeper is not None and keeper.pid == child.pid:
                return
            if child.poll() is not None:
                if keeper is not None:
                    return  # another start won the race: its keeper runs the sidecar
                if _recorded_pid(self.layout.pidfile) == child.pid:
                    return  # it ran the sidecar, which ended at once: status and the health wait say how
                raise ProcessSupervisorError(
                    f"the sidecar's keeper exited at once (status {child.returncode}): see {err_path} "
                    "(or 'delta-mem-mlx logs')"
                )
            time.sleep(_STARTUP_POLL_S)
        child.terminate()
        raise ProcessSupervisorError(
            f"the sidecar's keeper did not start within {KEEPER_STARTUP_S:.0f} s: see {err_path}"
        )

    def stop(self) -> None:
        """Ask the keeper to stop the sidecar; kill both (and their children) if they do not exit in time."""
        process = self.running_process()
        if process is not None:
            try:
                victims = [process, *process.children(recursive=True)]
            except psutil.NoSuchProcess:
                victims = [process]
            # Only the keeper is signalled: it stops the sidecar, which then shuts down gracefully once.
            _signal(process, psutil.Process.terminate)
            _, alive = psutil.wait_procs(victims, timeout=STOP_TIMEOUT_S)
            for victim in alive:
                _signal(victim, psutil.Process.kill)
            _, still_alive = psutil.wait_procs(alive, timeout=STOP_TIMEOUT_S)
            # A killed sidecar whose keeper died first is left for init to reap: a zombie has exited.
            still_alive = [victim for victim in still_alive if not _is_zombie(victim)]
            if still_alive:
                raise ProcessSupervisorError(f"process {still_alive[0].pid} did not exit after SIGKILL")
        self.layout.pidfile.unlink(missing_ok=True)
        self.keeper_state_file.unlink(missing_ok=True)

    def status(self) -> SupervisorStatus:
        """Running while the keeper (the pidfile's process) runs, unless it waits to restart the sidecar."""
        if not self.layout.pidfile.exists():
            return SupervisorStatus(self.kind, "stopped", None, "not running")
        keeper_state = _read_json(self.keeper_state_file)
        last_exit = _last_exit(keeper_state)
        process = self.running_process()
        if process is None:
            detail = f"stale pidfile {self.layout.pidfile}: the sidecar is not running"
            if keeper_state.get("state") == "gave-up":
                detail = (
                    f"the sidecar {keeper_state.get('last_exit', 'crashed')} and exited "
                    f"{keeper_state.get('quick_crashes', 'several')} times in a row: its keeper gave up "
                    "(see 'delta-mem-mlx logs')"
                )
            return SupervisorStatus(self.kind, "stopped", None, detail, last_exit)
        if keeper_state.get("state") == "restarting":
            detail = (
                f"the sidecar {keeper_state.get('last_exit', 'crashed')}; its keeper (pid {process.pid}) "
                "starts it again shortly"
            )
            return SupervisorStatus(self.kind, "stopped", process.pid, detail, last_exit)
        detail = f"background process {process.pid} (keeper)"
        if last_exit is not None:
            detail += f"; the sidecar last {last_exit.text()}"
        return SupervisorStatus(self.kind, "running", process.pid, detail, last_exit)

    def last_exit_status(self) -> int | None:
        """The status the sidecar last exited with, while its keeper waits to restart it or after it gave up."""
        returncode = _read_json(self.keeper_state_file).get("returncode")
        return returncode if isinstance(returncode, int) else None

    def uninstall(self) -> None:
        """Stop the sidecar and forget its pidfile."""
        self.stop()

    def running_process(self) -> psutil.Process | None:
        """The live keeper process the pidfile describes, or None."""
        record = _read_pidfile(self.layout.pidfile)
        if record is None:
            return None
        try:
            process = psutil.Process(record["pid"])
            same_start = abs(process.create_time() - record["create_time"]) < 0.01
            same_command = process.cmdline() == record["cmdline"]
            alive = process.status() != psutil.STATUS_ZOMBIE
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return None
        return process if same_start and same_command and alive else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(read_regular_file(path, _MAX_RECORD_BYTES))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _last_exit(keeper_state: dict[str, Any]) -> LastExit | None:
    """The sidecar's last exit from the keeper's state file (None: it has not exited since the start)."""
    returncode, exited_at, restarts = (keeper_state.get(k) for k in ("returncode", "exited_at", "restarts"))
    if not isinstance(returncode, int) or not isinstance(exited_at, (int, float)) or not isinstance(restarts, int):
        return None
    return last_exit_of(returncode, exited_at, restarts)


def _read_pidfile(path: Path) -> dict[str, Any] | None:
    record = _read_json(path)
    valid = (
        isinstance(record.get("pid"), int)
        and isinstance(record.get("create_time"), (int, float))
        and isinstance(record.get("cmdline"), list)
    )
    return record if valid else None


def _recorded_pid(pidfile: Path) -> int | None:
    record = _read_pidfile(pidfile)
    return None if record is None else record["pid"]


def live_children(process: psutil.Process, recursive: bool = False) -> list[psutil.Process]:
    """The process's children (all descendants if recursive) that still run: neither gone nor zombies."""
    try:
        children = process.children(recursive=recursive)
    except psutil.NoSuchProcess:
        return []
    # A child can exit between the listing and the look at its status: it counts as gone.
    return [child for child in children if not _is_zombie(child)]


def _is_zombie(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _signal(process: psutil.Process, send: Callable[[psutil.Process], None]) -> None:
    try:
        send(process)
    except psutil.NoSuchProcess:
        pass
