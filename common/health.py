"""Asking a sidecar whether it is ready: one `GET /health`, never raising."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from common.settings import SidecarSettings

# The readiness route OpenClaw's localService probes: 200 once the model has loaded (even if it was
# unloaded since: the next request loads it), 503 before. It needs no API key (OpenClaw's probe sends none).
READY_PATH = "/ready"

# The sidecar is local: a configured HTTP(S)_PROXY must not see (or break) requests to it.
_LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))


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
