"""Waiting for a started sidecar to answer `/health` ok, with a deadline and the supervisor's view."""

from __future__ import annotations

import time

from common.errors import UserError
from common.exit_codes import PORT_IN_USE
from common.health import Health, base_url, probe_health
from common.settings import SidecarSettings
from supervisors import Supervisor, tail_lines
from supervisors.keeper import describe_exit

POLL_INTERVAL_S = 0.5
# How long a start waits for /health by default: loading a 4B model from a cold disk can take minutes.
DEFAULT_HEALTH_TIMEOUT_S = 600.0
# Lines the keeper writes into the sidecar's error log; the sidecar's own last line says more.
_KEEPER_LOG_MARK = " keeper: "


class SidecarStartError(UserError):
    """The sidecar did not become healthy; the message says what was seen and where to look."""


def wait_until_healthy(settings: SidecarSettings, supervisor: Supervisor, timeout_s: float) -> Health:
    """Poll /health until the sidecar serving this root's model answers ok; raise SidecarStartError."""
    deadline = time.monotonic() + timeout_s
    while True:
        health = probe_health(settings)
        if health.ready and health.body is not None:
            served = health.body.get("model")
            if served != settings.model_id:
                raise SidecarStartError(
                    f"another server answers on {base_url(settings)} (model {served!r}, expected "
                    f"{settings.model_id!r}): stop it or choose another --port"
                )
            return health
        if health.body is not None and health.body.get("status") == "error":
            raise SidecarStartError(
                f"the sidecar could not load the model: {health.body.get('error', 'no reason given')}"
                f"{_log_hint(supervisor)}"
            )
        # A process-supervised sidecar that exited is not coming back soon (its keeper throttles
        # restarts or gave up), so its exit ends the wait at once.
        if supervisor.kind == "process" and (seen := supervisor.status()).state != "running":
            raise SidecarStartError(f"{_exit_text(settings, supervisor, seen.detail)}{_log_hint(supervisor)}")
        if time.monotonic() >= deadline:
            raise SidecarStartError(
                f"the sidecar was not healthy within {timeout_s:.0f} s ({health.error}; "
                f"{supervisor.status().detail}){_log_hint(supervisor)}"
            )
        time.sleep(POLL_INTERVAL_S)


def _exit_text(settings: SidecarSettings, supervisor: Supervisor, detail: str) -> str:
    returncode = supervisor.last_exit_status()
    if returncode is None:
        return f"the sidecar stopped before it was ready ({detail})"
    text = f"the sidecar {describe_exit(returncode)} before it was ready"
    if returncode == PORT_IN_USE:
        from supervisors.port_owner import describe_listener  # psutil, only when it is needed

        text += f": {settings.host}:{settings.port} is taken by {describe_listener(settings.port)}"
    return text


def _log_hint(supervisor: Supervisor) -> str:
    _, err_log = supervisor.log_paths()
    own = [line for line in tail_lines(err_log, 50) if _KEEPER_LOG_MARK not in line and line.strip()]
    seen = f"; its last log line: {own[-1].strip()}" if own else ""
    return f"{seen}. See 'delta-mem-mlx logs --root {supervisor.layout.root}'"
