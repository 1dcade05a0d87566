"""systemd supervision on Linux: a `systemctl --user` service that restarts the sidecar whenever it exits."""

from __future__ import annotations

from pathlib import Path

from common.exit_codes import CONFIG_ERROR
from common.files import atomic_write_text
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

UNIT_PREFIX = "delta-mem-mlx"
RESTART_SEC = 10


SHOW_PROPERTIES = (
    "ActiveState",
    "SubState",
    "MainPID",
    "Result",
    "ExecMainCode",
    "ExecMainStatus",
    "ExecMainExitTimestamp",
    "NRestarts",
)
# ExecMainCode: the si_code of the main process's end (0: it has not ended since its last start).
_CLD_EXITED = 1


class SystemctlError(ToolError):
    """A systemctl call that failed."""


def systemctl(*args: str) -> str:
    """Run `systemctl --user` with these arguments (no shell); its stdout, or SystemctlError."""
    return run_tool(["systemctl", "--user", *args], SystemctlError)


def parse_last_exit(fields: dict[str, str]) -> LastExit | None:
    """The main process's last exit from `systemctl show` fields (None while the current run has not ended)."""
    code, status = fields.get("ExecMainCode", "0"), fields.get("ExecMainStatus", "0")
    if not code.isdigit() or not status.isdigit() or int(code) == 0:
        return None
    number = int(status)
    exited = int(code) == _CLD_EXITED
    restarts = fields.get("NRestarts", "")
    return LastExit(
        description=describe_exit(number if exited else -number),
        code=number if exited else None,
        signal=None if exited else signal_name(number),
        time=fields.get("ExecMainExitTimestamp") or None,
        restarts=int(restarts) if restarts.isdigit() else None,
    )


def quote_arg(value: str) -> str:
    """Quote one word for a unit file: systemd's C-style quoting, with % and $ escaped."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%").replace("$", "$$")
    return f'"{escaped}"'


class SystemdSupervisor(Supervisor):
    """A user unit in ~/.config/systemd/user (the folder can be injected for tests)."""

    kind = "systemd"

    def __init__(self, root: Path, *, unit_dir: Path | None = None) -> None:
        super().__init__(root)
        self.unit_dir = unit_dir or Path.home() / ".config" / "systemd" / "user"
        self.unit_name = f"{UNIT_PREFIX}-{self.layout.tag}.service"

    @property
    def unit_path(self) -> Path:
        """Where the unit file lives."""
        return self.unit_dir / self.unit_name

    def unit_text(self) -> str:
        """The unit: run `serve` for the root, restart it whenever it exits, log into the root."""
        out_log, err_log = self.log_paths()
        environment = " ".join(quote_arg(f"{k}={v}") for k, v in sidecar_environment().items())
        return "\n".join(
            [
                "[Unit]",
                f"Description=delta-mem MLX sidecar for OpenClaw ({self.layout.root})",
                "",
                "[Service]",
                "Type=simple",
                "ExecStart=" + " ".join(quote_arg(arg) for arg in sidecar_command(self.layout.root)),
                f"WorkingDirectory={quote_arg(str(self.layout.root))}",
                f"Environment={environment}",
                # Like launchd's KeepAlive: any exit but `systemctl stop` (a stray SIGTERM too) restarts it.
                "Restart=always",
                # A configuration error does not go away by itself: no restart loop for it.
                f"RestartPreventExitStatus={CONFIG_ERROR}",
                f"RestartSec={RESTART_SEC}",
                f"StandardOutput=append:{out_log}",
                f"StandardError=append:{err_log}",
                "",
                "[Install]",
                "WantedBy=default.target",
                "",
            ]
        )

    def install(self) -> None:
        """Write the unit, reload systemd and enable the unit at login (does not start it)."""
        self.prepare_logs()
        atomic_write_text(self.unit_path, self.unit_text())
        systemctl("daemon-reload")
        systemctl("enable", self.unit_name)

    def is_installed(self) -> bool:
        """True when the unit file exists."""
        return self.unit_path.exists()

    def start(self) -> None:
        """Start the unit (systemd ignores a start of a running unit)."""
        if not self.is_installed():
            self.install()
        self.prepare_logs()
        systemctl("start", self.unit_name)

    def restart(self) -> None:
        """Restart the unit, picking up a rewritten unit file."""
        if not self.is_installed():
            self.install()
        self.prepare_logs()
        systemctl("daemon-reload")
        systemctl("restart", self.unit_name)

    def stop(self) -> None:
        """Stop the unit."""
        if self.is_installed():
            systemctl("stop", self.unit_name)

    def status(self) -> SupervisorStatus:
        """ActiveState, SubState, MainPID, Result and the main process's last exit from `systemctl --user show`."""
        if not self.is_installed():
            return SupervisorStatus(self.kind, "not-installed", None, f"no {self.unit_path}")
        output = systemctl("show", self.unit_name, f"--property={','.join(SHOW_PROPERTIES)}")
        fields = dict(line.split("=", 1) for line in output.splitlines() if "=" in line)
        active = fields.get("ActiveState", "unknown")
        pid = int(fields.get("MainPID", "0") or 0) or None
        detail = f"systemd unit {self.unit_name}: {active}/{fields.get('SubState', '?')}"
        if fields.get("Result", "success") != "success":
            detail += f", last result {fields['Result']}"
        last_exit = parse_last_exit(fields)
        if last_exit is not None:
            detail += f"; the sidecar last {last_exit.text()}"
        state = "running" if active in ("active", "reloading") else "stopped"
        return SupervisorStatus(self.kind, state, pid, detail, last_exit)

    def uninstall(self) -> None:
        """Stop and disable the unit and delete its file."""
        if self.is_installed():
            for action in (("stop",), ("disable",)):
                try:
                    systemctl(*action, self.unit_name)
                except SystemctlError:
                    pass  # removing the file below is what matters
            self.unit_path.unlink(missing_ok=True)
            systemctl("daemon-reload")
