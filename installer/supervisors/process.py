"""The fallback supervisor: a detached background process and a pidfile checked with psutil.

It starts, stops and reports; it does not restart a crashed sidecar (launchd and systemd do).
The pidfile records the pid, the process start time and the command line, so a stale pidfile
or a pid reused by another program is never taken for the sidecar.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from installer.supervisors import (
    STOP_TIMEOUT_S,
    Supervisor,
    SupervisorError,
    SupervisorStatus,
    sidecar_command,
    sidecar_environment,
)
from sidecar.files import atomic_write_json


class ProcessSupervisorError(SupervisorError):
    """The background process could not be started or stopped."""


class ProcessSupervisor(Supervisor):
    """A detached `serve` process with a pidfile under the root."""

    kind = "process"

    def install(self) -> None:
        """Nothing to register: just make the folders the process needs."""
        self.layout.pidfile.parent.mkdir(parents=True, exist_ok=True)
        self.prepare_logs()

    def is_installed(self) -> bool:
        """Always true: a plain process needs no registration."""
        return True

    def start(self) -> None:
        """Spawn the sidecar in its own session with its output in the root's logs."""
        if self.running_process() is not None:
            return
        self.install()
        command = sidecar_command(self.layout.root)
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
        try:
            created = psutil.Process(child.pid).create_time()
        except psutil.NoSuchProcess:
            raise ProcessSupervisorError(
                f"the sidecar exited at once: see {err_path} (or 'delta-mem-mlx logs')"
            ) from None
        atomic_write_json(self.layout.pidfile, {"pid": child.pid, "create_time": created, "cmdline": command})

    def stop(self) -> None:
        """Terminate the sidecar (and its children), killing it if it does not exit in time."""
        process = self.running_process()
        if process is not None:
            try:
                victims = [process, *process.children(recursive=True)]
            except psutil.NoSuchProcess:
                victims = [process]
            for victim in victims:
                _signal(victim, psutil.Process.terminate)
            _, alive = psutil.wait_procs(victims, timeout=STOP_TIMEOUT_S)
            for victim in alive:
                _signal(victim, psutil.Process.kill)
            _, still_alive = psutil.wait_procs(alive, timeout=STOP_TIMEOUT_S)
            if still_alive:
                raise ProcessSupervisorError(f"process {still_alive[0].pid} did not exit after SIGKILL")
        self.layout.pidfile.unlink(missing_ok=True)

    def status(self) -> SupervisorStatus:
        """Running only if the pidfile's pid is alive, started when recorded, with our command line."""
        if not self.layout.pidfile.exists():
            return SupervisorStatus(self.kind, "stopped", None, "not running")
        process = self.running_process()
        if process is None:
            return SupervisorStatus(
                self.kind, "stopped", None, f"stale pidfile {self.layout.pidfile}: the sidecar is not running"
            )
        return SupervisorStatus(self.kind, "running", process.pid, f"background process {process.pid}")

    def uninstall(self) -> None:
        """Stop the sidecar and forget its pidfile."""
        self.stop()

    def running_process(self) -> psutil.Process | None:
        """The live sidecar process the pidfile describes, or None."""
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


def _read_pidfile(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    valid = (
        isinstance(record, dict)
        and isinstance(record.get("pid"), int)
        and isinstance(record.get("create_time"), (int, float))
        and isinstance(record.get("cmdline"), list)
    )
    return record if valid else None


def _signal(process: psutil.Process, send: Callable[[psutil.Process], None]) -> None:
    try:
        send(process)
    except psutil.NoSuchProcess:
        pass
