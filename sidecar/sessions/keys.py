"""Which session a request belongs to, and the only form of its key that may be shown or stored."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

DEFAULT_SESSION_KEY = "default"

# First header found wins. OpenClaw sends the affinity headers (stable across the turns of one
# OpenClaw session) when the model's compat.sendSessionAffinityHeaders is true.
SESSION_HEADERS: tuple[str, ...] = (
    "x-openclaw-session-key",
    "x-session-affinity",
    "session_id",
    "x-client-request-id",
)

# Keys are held in memory per session; a longer key is replaced by its hash so that distinct
# keys stay distinct while memory stays bounded.
MAX_SESSION_KEY_CHARS = 256


def session_key_from_headers(headers: Mapping[str, str]) -> str:
    """The session key a request names (any characters; never used as a path)."""
    lowered = {name.lower(): value for name, value in headers.items()}
    for name in SESSION_HEADERS:
        value = lowered.get(name, "").strip()
        if value:
            if len(value) > MAX_SESSION_KEY_CHARS:
                return f"sha256:{hash_session_key(value)}"
            return value
    return DEFAULT_SESSION_KEY


def hash_session_key(key: str) -> str:
    """The sha256 hex digest of a key: the only form allowed in logs, headers and file names."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
