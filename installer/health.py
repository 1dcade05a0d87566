"""Asking a sidecar whether it is ready (`GET /health`), and waiting for it with a deadline."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from installer.supervisors import Supervisor, tail_lines
from sidecar.config import SidecarSettings

POLL_INTERVAL_S = 0.5

# The sidecar is local: a configured HTTP(S)_PROXY must not see (or break) requests to it.
_LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class SidecarStartError(RuntimeError):
    """The sidecar did not become healthy; the message says what was seen and where to look."""


@dataclass(frozen=True)
class Health:
    """One answer from `/health`: ready or not, the HTTP status, the JSON body, or why none came."""

    ready: bool
    status_code: int | None
    body: dict[str, Any] | None
    error: str | None

    def to_dict(self) -> dict[str, Any]:
        """The JSON form used by `status --json`."""
        return {"ready": self.ready, "status_code": self.status_code, "body": self.body, "error": self.error}


def base_url(settings: SidecarSettings) -> str:
    """The sidecar's URL as a local client reaches it (a wildcard bind is reached via loopback)."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(settings.host, settings.host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.port}"


def open_local(request: urllib.request.Request, timeout: float) -> Any:
    """Open a request to the local sidecar, bypassing any configured proxy."""
    return _LOCAL.open(request, timeout=timeout)


def probe_health(settings: SidecarSettings, timeout: float = 3.0) -> Health:
    """GET /health once; never raises for network or HTTP failures."""
    request = urllib.request.Request(f"{base_url(settings)}/health")
    if settings.api_key:
        request.add_header("Authorization", f"Bearer {settings.api_key}")
    try:
        with open_local(request, timeout) as response:
            code, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        code, raw = exc.code, exc.read()
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return Health(False, None, None, f"no answer ({reason})")
    try:
        body = json.loads(raw)
    except ValueError:
        return Health(False, code, None, f"HTTP {code} with a body that is not JSON")
    if not isinstance(body, dict):
        return Health(False, code, None, f"HTTP {code} with a body that is not a JSON object")
    ready = code == 200 and body.get("status") == "ok"
    return Health(ready, code, body, None if ready else f"HTTP {code} ({body.get('status', 'no status')})")


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
