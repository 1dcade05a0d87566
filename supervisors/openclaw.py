"""OpenClaw as the supervisor: it starts the sidecar on demand (its provider's `localService`) and
stops it after it has been idle; nothing is installed here and nothing is started by this tool.

`provider-config --apply` writes the provider block whose `localService` runs `serve --root ROOT`
(plugin_tools/provider_config.py). `status` sees a sidecar OpenClaw started because it answers
/health on the root's port with the root's model.
"""

from __future__ import annotations

import psutil

from common.errors import UserError
from common.health import probe_health
from common.settings import SettingsError, load_settings
from supervisors import STOP_TIMEOUT_S, Supervisor, SupervisorStatus

STATUS_HEALTH_TIMEOUT_S = 2.0


class StartedByOpenClaw(UserError, RuntimeError):
    """This root's sidecar is OpenClaw's to start: a start through this tool would fight it."""


def refuse_cli_start(root_flag: str) -> StartedByOpenClaw:
    """The refusal `start-sidecar` and `restart-sidecar` give on a root OpenClaw starts."""
    return StartedByOpenClaw(
        "this root's sidecar is started by OpenClaw when one of its agents needs the model "
        "(models.providers.delta-mem-mlx.localService), and stopped by OpenClaw when idle; "
        "starting it here too would fight it",
        hint=f"run 'delta-mem-mlx provider-config --apply{root_flag}' once, then use OpenClaw; "
        f"'delta-mem-mlx serve --root ...' runs it in a terminal; or reinstall with --supervisor "
        "launchd, systemd or process to keep it running yourself",
    )


class OpenClawSupervisor(Supervisor):
    """No job file, no unit, no keeper: OpenClaw spawns `serve --root` itself."""

    kind = "openclaw"

    def install(self) -> None:
        """Only the log folder: the sidecar OpenClaw starts appends its logs there (--log-to-root)."""
        self.layout.logs.mkdir(parents=True, exist_ok=True)

    def is_installed(self) -> bool:
        """Always: there is nothing to install."""
        return True

    def start(self) -> None:
        """Refused: OpenClaw starts this sidecar."""
        raise refuse_cli_start(f" --root {self.layout.root}")

    def stop(self) -> None:
        """Stop a sidecar of this root that OpenClaw started (OpenClaw starts it again on demand)."""
        process = self._running_sidecar()
        if process is None:
            return
        try:
            process.terminate()
            process.wait(timeout=STOP_TIMEOUT_S)
        except psutil.NoSuchProcess:
            return
        except psutil.TimeoutExpired:
            process.kill()

    def status(self) -> SupervisorStatus:
        """Running when a sidecar of this root answers on its port (OpenClaw started it), else stopped."""
        process = self._running_sidecar()
        if process is None:
            return SupervisorStatus(
                self.kind, "stopped", None, "not running: OpenClaw starts it when an agent needs the model"
            )
        return SupervisorStatus(self.kind, "running", process.pid, f"started by OpenClaw, pid {process.pid}")

    def uninstall(self) -> None:
        """Stop a running sidecar of this root; there is no supervision to remove."""
        self.stop()

    def _running_sidecar(self) -> psutil.Process | None:
        """The process serving this root's model on its port, or None."""
        try:
            settings = load_settings(self.layout.root)
        except SettingsError:
            return None
        health = probe_health(settings, timeout=STATUS_HEALTH_TIMEOUT_S)
        if health.body is None or health.body.get("model") != settings.model_id:
            return None
        from supervisors.port_owner import listener_pid

        pid = listener_pid(settings.port)
        if pid is None:
            return None
        try:
            return psutil.Process(pid)
        except psutil.NoSuchProcess:
            return None
