"""Keeping the sidecar running: one interface, four kinds (launchd, systemd --user, a plain process,
or OpenClaw itself, which starts it on demand and stops it when idle).

The kind is chosen at install time and recorded in the receipt; `supervisor_for_root` reads it back.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal, get_args

from common.errors import UserError
from common.layout import RootLayout
from common.receipt import read_receipt

SupervisorKind = Literal["launchd", "systemd", "process", "openclaw"]
SupervisorState = Literal["running", "stopped", "not-installed"]

# Logs are rotated (one backup kept) whenever the sidecar is (re)started through the CLI.
LOG_MAX_BYTES = 10 * 1024**2
STOP_TIMEOUT_S = 20.0
TAIL_READ_BYTES = 256 * 1024


class SupervisorError(UserError, RuntimeError):
    """A supervisor command that failed, with its output."""

    topic = "supervisor"


@dataclass(frozen=True)
class LastExit:
    """How the sidecar last exited, as far as its supervisor tells (None: it does not say)."""

    description: str  # 'was killed by SIGTERM', 'exited with status 3'
    code: int | None  # the exit status, when it exited by itself
    signal: str | None  # 'SIGTERM', when a signal ended it
    time: str | None  # when, as the supervisor gives it (ISO 8601 UTC for the keeper)
    restarts: int | None  # how many times the supervisor started it again since its own start

    def text(self) -> str:
        """'was killed by SIGTERM at 2026-12-07T01:50:02Z; restarted 1 time since start-sidecar'."""
        parts = [self.description + (f" at {self.time}" if self.time else "")]
        if self.restarts is not None:
            parts.append(f"restarted {self.restarts} time{'' if self.restarts == 1 else 's'} since start-sidecar")
        return "; ".join(parts)


@dataclass(frozen=True)
class SupervisorStatus:
    """What the supervisor says about the sidecar: kind, state, pid if running, a detail line, its last exit."""

    kind: str
    state: SupervisorState
    pid: int | None
    detail: str
    last_exit: LastExit | None = None

    def to_dict(self) -> dict[str, object]:
        """The JSON form used by `status --json` and the plugin's status tool."""
        return asdict(self)


class Supervisor(ABC):
    """Install, start, stop, inspect and remove the supervision of one root's sidecar."""

    kind: SupervisorKind

    def __init__(self, root: Path) -> None:
        self.layout = RootLayout.of(root)

    @abstractmethod
    def install(self) -> None:
        """Write whatever the supervisor needs (job file, folders) without starting the sidecar."""

    @abstractmethod
    def is_installed(self) -> bool:
        """True when this root's supervision is in place."""

    @abstractmethod
    def start(self) -> None:
        """Start the sidecar (a no-op if it is already running)."""

    @abstractmethod
    def stop(self) -> None:
        """Stop the sidecar and keep it stopped until the next start."""

    @abstractmethod
    def status(self) -> SupervisorStatus:
        """The current state of the sidecar as the supervisor sees it."""

    @abstractmethod
    def uninstall(self) -> None:
        """Stop the sidecar and remove its supervision; leaves the root's files alone."""

    def last_exit_status(self) -> int | None:
        """The sidecar's last exit status when the supervisor knows it and the sidecar is not running."""
        return None

    def restart(self) -> None:
        """Stop, then start again."""
        self.stop()
        self.start()

    def log_paths(self) -> tuple[Path, Path]:
        """The sidecar's stdout and stderr logs."""
        return self.layout.stdout_log, self.layout.stderr_log

    def prepare_logs(self) -> None:
        """Create the log folder and rotate logs that grew past LOG_MAX_BYTES."""
        self.layout.logs.mkdir(parents=True, exist_ok=True)
        for log in self.log_paths():
            if log.exists() and log.stat().st_size > LOG_MAX_BYTES:
                os.replace(log, log.with_name(log.name + ".1"))


def iso_time(seconds: float) -> str:
    """A Unix time as ISO 8601 UTC to the second: '2026-12-07T01:50:02Z'."""
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def tail_lines(path: Path, count: int) -> list[str]:
    """The last `count` lines of a log file (reads only its end); empty when it does not exist."""
    try:
        with Path(path).open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - TAIL_READ_BYTES))
            data = handle.read()
    except FileNotFoundError:
        return []
    lines = data.decode("utf-8", errors="replace").splitlines()
    return lines[-count:] if count > 0 else []


def sidecar_command(root: Path) -> list[str]:
    """The supervised command: this Python running `serve` for the root."""
    return [sys.executable, "-m", "installer", "serve", "--root", str(RootLayout.of(root).root)]


def sidecar_environment() -> dict[str, str]:
    """Environment for the supervised sidecar: this PATH (to find qmd), unbuffered logs, no Hub access."""
    return {
        "PATH": os.environ.get("PATH", os.defpath),
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
    }


class ToolError(SupervisorError):
    """A supervisor tool (launchctl, systemctl) that failed; keeps its exit code and output."""

    def __init__(
        self, message: str, returncode: int | None = None, stdout: str = "", stderr: str = ""
    ) -> None:
        super().__init__(message)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr


def run_tool(argv: list[str], error: type[ToolError], timeout: float = 60.0) -> str:
    """Run a supervisor tool (an argument list, never a shell); its stdout, or `error` on failure."""
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError:
        raise error(f"{argv[0]} is not installed or not on PATH") from None
    except subprocess.TimeoutExpired:
        raise error(f"{' '.join(argv)} did not finish within {timeout:.0f} s") from None
    if result.returncode != 0:
        output = (result.stderr or result.stdout).strip().splitlines()
        tail = output[-1] if output else "no output"
        raise error(
            f"{' '.join(argv)} failed with exit code {result.returncode}: {tail}",
            result.returncode,
            result.stdout,
            result.stderr,
        )
    return result.stdout


def systemd_user_available() -> bool:
    """True on Linux booted with systemd where this user's service manager answers."""
    if platform.system() != "Linux" or not Path("/run/systemd/system").is_dir():
        return False
    if shutil.which("systemctl") is None:
        return False
    probe = subprocess.run(
        ["systemctl", "--user", "show-environment"], capture_output=True, timeout=10, check=False
    )
    return probe.returncode == 0


def default_kind() -> SupervisorKind:
    """launchd on macOS, systemd --user where it runs, else a plain background process."""
    if platform.system() == "Darwin":
        return "launchd"
    if systemd_user_available():
        return "systemd"
    return "process"


def make_supervisor(kind: str, root: Path) -> Supervisor:
    """The supervisor of the given kind for a root."""
    if kind == "launchd":
        from supervisors.launchd import LaunchdSupervisor

        return LaunchdSupervisor(root)
    if kind == "systemd":
        from supervisors.systemd import SystemdSupervisor

        return SystemdSupervisor(root)
    if kind == "process":
        from supervisors.process import ProcessSupervisor

        return ProcessSupervisor(root)
    if kind == "openclaw":
        from supervisors.openclaw import OpenClawSupervisor

        return OpenClawSupervisor(root)
    raise SupervisorError(f"unknown supervisor {kind!r}: choose one of {', '.join(get_args(SupervisorKind))}")


def supervisor_for_root(root: Path) -> Supervisor:
    """The supervisor recorded in the root's receipt, or this machine's default when there is none."""
    receipt = read_receipt(root)
    return make_supervisor(receipt.supervisor if receipt else default_kind(), root)
