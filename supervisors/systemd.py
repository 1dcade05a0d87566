"""systemd supervision on Linux: a `systemctl --user` service that restarts the sidecar on failure."""

from __future__ import annotations

from pathlib import Path

from common.exit_codes import CONFIG_ERROR
from common.files import atomic_write_text
from supervisors import (
    Supervisor,
    SupervisorStatus,
    ToolError,
    run_tool,
    sidecar_command,
    sidecar_environment,
)

UNIT_PREFIX = "delta-mem-mlx"
RESTART_SEC = 10


class SystemctlError(ToolError):
    """A systemctl call that failed."""


def systemctl(*args: str) -> str:
    """Run `systemctl --user` with these arguments (no shell); its stdout, or SystemctlError."""
    return run_tool(["systemctl", "--user", *args], SystemctlError)


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
        """The unit: run `serve` for the root, restart on failure, log into the root."""
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
                "Restart=on-failure",
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
        """ActiveState, SubState and MainPID from `systemctl --user show`."""
        if not self.is_installed():
            return SupervisorStatus(self.kind, "not-installed", None, f"no {self.unit_path}")
        output = systemctl("show", self.unit_name, "--property=ActiveState,SubState,MainPID,Result")
        fields = dict(line.split("=", 1) for line in output.splitlines() if "=" in line)
        active = fields.get("ActiveState", "unknown")
        pid = int(fields.get("MainPID", "0") or 0) or None
        detail = f"systemd unit {self.unit_name}: {active}/{fields.get('SubState', '?')}"
        if fields.get("Result", "success") != "success":
            detail += f", last result {fields['Result']}"
        state = "running" if active in ("active", "reloading") else "stopped"
        return SupervisorStatus(self.kind, state, pid, detail)

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
