"""Who listens on a TCP port, so that a refused start can name the program in the way."""

from __future__ import annotations

import socket
from typing import Any

import psutil


def port_is_free(host: str, port: int) -> bool:
    """True when this process could listen on host:port now (as the sidecar will try to)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError:
        return False
    return True


def listener_pid(port: int) -> int | None:
    """The pid of a process listening on `port` (any address), or None when it cannot be seen.

    The system-wide table needs privileges on macOS; there, this user's own processes are asked
    one by one, which finds every listener the user could stop.
    """
    try:
        connections = psutil.net_connections(kind="inet")
    except psutil.AccessDenied:
        connections = []
        for process in psutil.process_iter():
            try:
                if any(_listens(c, port) for c in process.net_connections(kind="inet")):
                    return process.pid
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
    return next((c.pid for c in connections if _listens(c, port) and c.pid), None)


def describe_listener(port: int) -> str:
    """'pid 123 (python3 -m http.server 8765)', or a plain phrase when the listener cannot be seen."""
    pid = listener_pid(port)
    if pid is None:
        return "another program (its pid is not visible to this user)"
    try:
        command = " ".join(psutil.Process(pid).cmdline()) or psutil.Process(pid).name()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return f"pid {pid}"
    shown = command if len(command) <= 160 else command[:157] + "..."
    return f"pid {pid} ({shown})"


def _listens(connection: Any, port: int) -> bool:
    return connection.status == psutil.CONN_LISTEN and bool(connection.laddr) and connection.laddr.port == port
