"""Waiting for a started sidecar to answer `/health` ok, with a deadline and the supervisor's view."""

from __future__ import annotations

import time

from common.errors import UserError
from common.health import Health, base_url, probe_health
from common.settings import SidecarSettings
from supervisors import Supervisor, tail_lines

POLL_INTERVAL_S = 0.5
# How long a start waits for /health by default: loading a 4B model from a cold disk can take minutes.
DEFAULT_HEALTH_TIMEOUT_S = 600.0


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
        if supervisor.kind == "process" and supervisor.status().state != "running":
            raise SidecarStartError(f"the sidecar exited before it was ready{_log_hint(supervisor)}")
        if time.monotonic() >= deadline:
            raise SidecarStartError(
                f"the sidecar was not healthy within {timeout_s:.0f} s ({health.error}; "
                f"{supervisor.status().detail}){_log_hint(supervisor)}"
            )
        time.sleep(POLL_INTERVAL_S)


def _log_hint(supervisor: Supervisor) -> str:
    _, err_log = supervisor.log_paths()
    last = tail_lines(err_log, 1)
    seen = f"; last log line: {last[0].strip()}" if last else ""
    return f"{seen}. See 'delta-mem-mlx logs --root {supervisor.layout.root}'"
