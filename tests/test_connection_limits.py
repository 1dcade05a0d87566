"""Connections that never finish their request: a flood, slow headers, a slow body, against a real server.

The server holds at most 40 connections and gives a request's headers and body 1 s each, so the
sweep stays short; `python -m bench.connection_flood` runs the same floods at the defaults.
"""

from __future__ import annotations

import resource
import selectors
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from reliability import AUTH, record_figures
from server_process import Server, start_server, stop_server

from sidecar.server.connection_limits import OPEN_FILES

MAX_CONNECTIONS = 40
TIMEOUT_S = 1.0
FLOOD = 150
HALF_REQUEST = b"GET /health HTTP/1.1\r\nHost: sidecar\r\n"  # no blank line: the headers never end


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tiny_adapter_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = start_server(
        tiny_model_dir, tiny_adapter_dir, tmp_path_factory.mktemp("connections"),
        "--max-connections", str(MAX_CONNECTIONS), "--header-timeout", str(TIMEOUT_S), "--body-timeout", str(TIMEOUT_S),
    )
    yield running
    stop_server(running)


def connect(server: Server, first_bytes: bytes) -> socket.socket:
    host, port = server.base_url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(first_bytes)
    return sock


def health_ok(server: Server) -> bool:
    try:
        return httpx.get(f"{server.base_url}/health", headers=AUTH, timeout=10).status_code == 200
    except httpx.HTTPError:
        return False


def closed_by_server(sockets: list[socket.socket], deadline_s: float) -> list[bytes]:
    """Wait (until a deadline) for the server to close each socket; what each received before EOF."""
    selector = selectors.DefaultSelector()
    received: dict[socket.socket, bytes] = {}
    for sock in sockets:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
        received[sock] = b""
    done: list[bytes] = []
    deadline = time.monotonic() + deadline_s
    while received and time.monotonic() < deadline:
        for key, _ in selector.select(timeout=0.1):
            sock = key.fileobj
            try:
                data = sock.recv(4096)
            except ConnectionResetError:
                data = b""
            if data:
                received[sock] += data
                continue
            selector.unregister(sock)
            done.append(received.pop(sock))
    selector.close()
    return done


def held_by_server(server: Server) -> int:
    """Connections to the server's port that its process holds open now."""
    port = int(server.base_url.rsplit(":", 1)[1])
    connections = psutil.Process(server.process.pid).net_connections(kind="tcp")
    return sum(1 for c in connections if c.laddr and c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED)


def test_a_flood_of_half_requests_cannot_lock_out_health(server: Server) -> None:
    log_before = len(server.log_text())
    held: list[socket.socket] = []
    answered, most_held = 0, 0
    try:
        for i in range(FLOOD):
            held.append(connect(server, HALF_REQUEST))
            if i % 30 == 29:
                answered += health_ok(server)
                most_held = max(most_held, held_by_server(server))
        closed = closed_by_server(held, deadline_s=TIMEOUT_S + 10)
    finally:
        for sock in held:
            sock.close()
    log = server.log_text()[log_before:]
    timed_out = sum(1 for answer in closed if answer.startswith(b"HTTP/1.1 408"))
    record_figures("connection_flood", {
        "opened": FLOOD, "max_connections": MAX_CONNECTIONS, "health_answered": f"{answered}/{FLOOD // 30}",
        "most_held_by_server": most_held, "closed_by_server": len(closed), "of_them_408": timed_out,
        "log_bytes": len(log),
    })
    assert answered == FLOOD // 30, "/health did not answer while the connections were held"
    assert most_held <= MAX_CONNECTIONS
    # Beyond the cap each new connection closed the one that had waited longest; the rest timed out.
    assert len(closed) == FLOOD
    assert "Traceback" not in log and "out of system resource" not in log
    # Warnings of one kind are rate-limited: a handful per minute, not one per connection.
    assert log.count("closed the one that waited longest") <= 5
    assert log.count("request headers did not arrive") <= 5


def test_headers_sent_slowly_are_cut_off_with_a_408(server: Server) -> None:
    sock = connect(server, b"GET /health HTTP/1.1\r\n")
    began = time.monotonic()
    try:
        sock.settimeout(0.2)
        answer = b""
        while time.monotonic() - began < TIMEOUT_S + 10:
            try:
                sock.sendall(b"X-Slow: drip\r\n")  # bytes keep coming, the headers never end
                chunk = sock.recv(4096)
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
            if not chunk:
                break
            answer += chunk
    finally:
        sock.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer


def test_a_body_that_stops_arriving_is_cut_off(server: Server) -> None:
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: sidecar\r\nAuthorization: Bearer e2e-key\r\n"
        b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"model\": "
    )
    sock = connect(server, head)
    try:
        [answer] = closed_by_server([sock], deadline_s=TIMEOUT_S + 10)
    finally:
        sock.close()
    assert answer == b"" or b" 500 " not in answer
    assert "request body did not arrive within 1 s" in server.log_text()
    assert health_ok(server)


def test_the_open_file_limit_leaves_room_for_the_connections(server: Server) -> None:
    if not hasattr(psutil.Process, "rlimit"):
        pytest.skip("psutil reads another process's limits on Linux only")
    soft, hard = psutil.Process(server.process.pid).rlimit(resource.RLIMIT_NOFILE)
    # mlx-lm sets (2048, 4096) when imported; the server takes the soft limit back up.
    assert soft >= min(OPEN_FILES, hard), (soft, hard)
