"""launchd supervision on macOS: a per-user LaunchAgent driven with `launchctl`.

The start order survives launchd's memory of a disabled job: bootout (errors ignored) → enable →
bootstrap → kickstart -k. Stop boots the job out and disables it, so it stays stopped across
logins until the next start.
"""

from __future__ import annotations

import os
import plistlib
import re
import time
from pathlib import Path
from typing import Any

from common.files import atomic_write_bytes
from supervisors import (
    LastExit,
    Supervisor,
    SupervisorStatus,
    ToolError,
    run_tool,
    sidecar_command,
    sidecar_environment,
)
from supervisors.keeper import describe_exit, signal_name

LABEL_PREFIX = "ai.openclaw.delta-mem-mlx"
THROTTLE_INTERVAL_S = 10
BOOTOUT_IN_PROGRESS = 36  # "Operation now in progress": the job is still shutting down
UNLOAD_TIMEOUT_S = 15.0

_PRINT_FIELD = re.compile(r"^\s*(state|pid|runs|last exit code|last terminating signal)\s*=\s*(.+?)\s*$")
_LEADING_NUMBER = re.compile(r"^(\d+)")
_TRAILING_NUMBER = re.compile(r"(\d+)\s*$")


class LaunchctlError(ToolError):
    """A launchctl call that failed."""


def launchctl(*args: str) -> str:
    """Run `launchctl` with these arguments (no shell); its stdout, or LaunchctlError with its output."""
    return run_tool(["launchctl", *args], LaunchctlError)


def parse_print(output: str) -> dict[str, str]:
    """The job's own `state`, `pid`, `runs`, `last exit code` and `last terminating signal` from `launchctl print`
    (nested blocks skipped)."""
    fields: dict[str, str] = {}
    depth = 0
    for line in output.splitlines():
        if depth == 1:
            match = _PRINT_FIELD.match(line)
            if match and match.group(1) not in fields:
                fields[match.group(1)] = match.group(2)
        depth += line.count("{") - line.count("}")
    return fields


def parse_last_exit(fields: dict[str, str]) -> LastExit | None:
    """The job's last exit from `parse_print` fields: 'last terminating signal = Terminated: 15' when a signal
    ended it, else 'last exit code = 78: EX_CONFIG' (None: it never exited)."""
    runs = fields.get("runs", "")
    restarts = int(runs) - 1 if runs.isdigit() and int(runs) > 0 else None
    signal_match = _TRAILING_NUMBER.search(fields.get("last terminating signal", ""))
    if signal_match:
        number = int(signal_match.group(1))
        return LastExit(describe_exit(-number), None, signal_name(number), None, restarts)
    code_match = _LEADING_NUMBER.match(fields.get("last exit code", ""))
    if code_match:
        code = int(code_match.group(1))
        return LastExit(describe_exit(code), code, None, None, restarts)
    return None


class LaunchdSupervisor(Supervisor):
    """A LaunchAgent in ~/Library/LaunchAgents (the folder and uid can be injected for tests)."""

    kind = "launchd"

    def __init__(self, root: Path, *, agents_dir: Path | None = None, uid: int | None = None) -> None:
        super().__init__(root)
        self.agents_dir = agents_dir or Path.home() / "Library" / "LaunchAgents"
        self.uid = os.getuid() if uid is None else uid
        self.label = f"{LABEL_PREFIX}.{self.layout.tag}"

    @property
    def plist_path(self) -> Path:
        """Where the job's plist lives."""
        return self.agents_dir / f"{self.label}.plist"

    @property
    def domain(self) -> str:
        """The user's GUI launchd domain."""
        return f"gui/{self.uid}"

    @property
    def target(self) -> str:
        """The job's service target, `gui/<uid>/<label>`."""
        return f"{self.domain}/{self.label}"

    def plist(self) -> dict[str, Any]:
        """The job definition: run `serve` for the root, keep it alive, back off crash loops."""
        out_log, err_log = self.log_paths()
        return {
            "Label": self.label,
            "ProgramArguments": sidecar_command(self.layout.root),
            "RunAtLoad": True,
            "KeepAlive": True,
            "ThrottleInterval": THROTTLE_INTERVAL_S,
            "ProcessType": "Interactive",  # no background throttling of a latency-bound server
            "WorkingDirectory": str(self.layout.root),
            "StandardOutPath": str(out_log),
            "StandardErrorPath": str(err_log),
            "EnvironmentVariables": sidecar_environment(),
        }

    def install(self) -> None:
        """Write the plist atomically (mode 0644); does not load it."""
        self.prepare_logs()
        atomic_write_bytes(self.plist_path, plistlib.dumps(self.plist()), mode=0o644)

    def is_installed(self) -> bool:
        """True when the plist exists."""
        return self.plist_path.exists()

    def start(self) -> None:
        """Load and start the job unless it is already running."""
        if self.status().state != "running":
            self.restart()

    def restart(self) -> None:
        """(Re)load the plist and (re)start the job: bootout → enable → bootstrap → kickstart -k."""
        if not self.is_installed():
            self.install()
        self.prepare_logs()
        self._bootout()
        launchctl("enable", self.target)
        try:
            launchctl("bootstrap", self.domain, str(self.plist_path))
        except LaunchctlError as exc:
            raise LaunchctlError(
                f"{exc} (the {self.domain} domain exists only for a user logged in to the desktop; "
                "over SSH, use --supervisor process)",
                exc.returncode,
                exc.stdout,
                exc.stderr,
            ) from exc
        launchctl("kickstart", "-k", self.target)

    def stop(self) -> None:
        """Unload the job and disable it so it stays stopped across logins."""
        self._bootout()
        if self.is_installed():
            launchctl("disable", self.target)

    def status(self) -> SupervisorStatus:
        """State, pid and last exit code from `launchctl print`."""
        if not self.is_installed():
            return SupervisorStatus(self.kind, "not-installed", None, f"no {self.plist_path}")
        try:
            fields = parse_print(launchctl("print", self.target))
        except LaunchctlError:
            return SupervisorStatus(self.kind, "stopped", None, f"{self.label} is not loaded")
        state = fields.get("state", "unknown")
        pid_text = fields.get("pid", "")
        pid = int(pid_text) if pid_text.isdigit() else None
        detail = f"launchd job {self.label}: {state}"
        last_exit = parse_last_exit(fields)
        if last_exit is not None:
            detail += f"; the sidecar last {last_exit.text()}"
        elif "last exit code" in fields:
            detail += f", last exit code {fields['last exit code']}"
        return SupervisorStatus(self.kind, "running" if state == "running" else "stopped", pid, detail, last_exit)

    def uninstall(self) -> None:
        """Unload the job and delete its plist."""
        self._bootout()
        self.plist_path.unlink(missing_ok=True)

    def _bootout(self) -> None:
        try:
            launchctl("bootout", self.target)
        except LaunchctlError as exc:
            # Any other failure means "not loaded", which is what we want.
            if exc.returncode == BOOTOUT_IN_PROGRESS:
                self._wait_until_unloaded()

    def _wait_until_unloaded(self) -> None:
        deadline = time.monotonic() + UNLOAD_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                launchctl("print", self.target)
            except LaunchctlError:
                return
            time.sleep(0.2)
        raise LaunchctlError(
            f"{self.label} is still shutting down after {UNLOAD_TIMEOUT_S:.0f} s: run the command again"
        )
