"""How many connections the server holds, how long a request may take to arrive, and the open
files that takes. Light (standard library only), so the CLI can read the defaults without uvicorn."""

from __future__ import annotations

import logging
import resource
from dataclasses import dataclass

log = logging.getLogger("sidecar.server.connections")

# mlx-lm sets the open-file limits to (2048, 4096) when imported; 4096 is the most it leaves.
OPEN_FILES = 4096
# Model and state files, QMD pipes, logs, the listening socket, the event loop's own.
RESERVED_FILES = 256


@dataclass(frozen=True)
class ConnectionLimits:
    """How many connections the server holds, and how long a request may take to arrive."""

    max_connections: int = 1000
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0


def raise_open_file_limit(wanted: int = OPEN_FILES) -> int:
    """Raise the soft limit on open files to `wanted` (within the hard limit); returns the limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def fit_to_open_files(limits: ConnectionLimits, open_files: int) -> ConnectionLimits:
    """The limits with the connection cap lowered, if needed, to leave RESERVED_FILES free."""
    room = max(1, open_files - RESERVED_FILES)
    if limits.max_connections <= room:
        return limits
    log.warning("the open-file limit is %d: holding at most %d connections instead of %d",
                open_files, room, limits.max_connections)
    return ConnectionLimits(room, limits.header_timeout_s, limits.body_timeout_s)
