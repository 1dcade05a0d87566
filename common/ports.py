"""Free local ports, for starting a sidecar where nothing listens yet."""

from __future__ import annotations

import socket

from common.settings import DEFAULT_HOST


def free_port(host: str = DEFAULT_HOST) -> int:
    """A port that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
