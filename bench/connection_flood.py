"""Connection floods against a supervised sidecar: `python -m bench.connection_flood --json`.

Starts `serve --root` on the generated tiny model with its stdout and stderr appended to the root's
log files, as the supervisors run it, then, with `/health` timed every 0.25 s throughout:

1. opens `--connections` connections (2,100 by default: more than mlx-lm's 2,048 open files) that
   each send half a request and hold it, past the header timeout;
2. drips the headers of `--slow` more connections, one line a second, for longer than the timeout;
3. sends `--slow` requests whose bodies stop arriving, past the body timeout.

Reports, per phase, how many /health calls answered and how fast, the most connections and file
descriptors the server held, the connections it closed, and the bytes its log grew by.
"""

from __future__ import annotations

import argparse
import http.client
import json
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from common.layout import RootLayout
from common.settings import SidecarSettings, save_settings
from sidecar.testing.tiny_model import write_tiny_adapter, write_tiny_model

HALF_REQUEST = b"GET /health HTTP/1.1\r\nHost: sidecar\r\n"
POLL_S = 0.25
STARTUP_TIMEOUT_S = 300.0


@dataclass
class Sidecar:
    """A `serve --root` process, its port and its log files."""

    process: subprocess.Popen[bytes]
    port: int
    layout: RootLayout

    def log_bytes(self) -> int:
        """Bytes in the stdout and stderr logs and their rotated copies."""
        paths = [self.layout.stdout_log, self.layout.stderr_log]
        paths += [path.with_name(path.name + ".1") for path in paths]
        return sum(path.stat().st_size for path in paths if path.exists())


@dataclass
class Phase:
    """What one flood measured."""

    health_ms: list[float] = field(default_factory=list)
    health_failed: int = 0
    most_held: int = 0
    most_fds: int = 0

    def report(self, opened: int, closed: int, log_bytes: int) -> dict[str, Any]:
        """The phase's figures."""
        answered = len(self.health_ms)
        return {
            "connections_opened": opened,
            "closed_by_server": closed,
            "most_connections_held_by_server": self.most_held,
            "most_server_fds": self.most_fds,
            "health_answered": f"{answered}/{answered + self.health_failed}",
            "health_ms_median": round(statistics.median(self.health_ms), 1) if self.health_ms else None,
            "health_ms_max": round(max(self.health_ms), 1) if self.health_ms else None,
            "log_bytes_added": log_bytes,
        }


def main(argv: list[str] | None = None) -> int:
    """Run the floods and print the report."""
    args = _parser().parse_args(argv)
    _raise_own_file_limit(args.connections + 2 * args.slow + 256)
    with tempfile.TemporaryDirectory(prefix="delta-mem-flood-") as tmp:
        sidecar = _start(Path(tmp), args)
        try:
            report = {
                "settings": {"max_connections": args.max_connections, "header_timeout_s": args.header_timeout,
                             "body_timeout_s": args.body_timeout},
                "half_requests": _half_requests(sidecar, args.connections, args.header_timeout),
                "slow_headers": _slow_headers(sidecar, args.slow, args.header_timeout),
                "slow_bodies": _slow_bodies(sidecar, args.slow, args.body_timeout),
            }
        finally:
            sidecar.process.terminate()
            sidecar.process.wait(timeout=60)
    print(json.dumps(report) if args.json else json.dumps(report, indent=2))
    return 0


def _half_requests(sidecar: Sidecar, count: int, header_timeout: float) -> dict[str, Any]:
    phase, log_before = Phase(), sidecar.log_bytes()
    held: list[socket.socket] = []
    for i in range(count):
        held.append(_connect(sidecar.port, HALF_REQUEST))
        if i % 100 == 99:
            _observe(sidecar, phase)
    closed = _hold(sidecar, phase, held, _past(header_timeout), keep_sending=None)
    return phase.report(count, closed, sidecar.log_bytes() - log_before)


def _slow_headers(sidecar: Sidecar, count: int, header_timeout: float) -> dict[str, Any]:
    phase, log_before = Phase(), sidecar.log_bytes()
    held = [_connect(sidecar.port, b"GET /health HTTP/1.1\r\n") for _ in range(count)]
    closed = _hold(sidecar, phase, held, _past(header_timeout), keep_sending=b"X-Drip: one line a second\r\n")
    return phase.report(count, closed, sidecar.log_bytes() - log_before)


def _slow_bodies(sidecar: Sidecar, count: int, body_timeout: float) -> dict[str, Any]:
    phase, log_before = Phase(), sidecar.log_bytes()
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: sidecar\r\nContent-Type: application/json\r\n"
        b'Content-Length: 100000\r\n\r\n{"model": "'
    )
    held = [_connect(sidecar.port, head) for _ in range(count)]
    closed = _hold(sidecar, phase, held, _past(body_timeout), keep_sending=None)
    return phase.report(count, closed, sidecar.log_bytes() - log_before)


def _past(timeout: float) -> float:
    """How long to hold connections so that a server with this timeout has closed them all."""
    return 1.5 * timeout + 1


def _hold(
    sidecar: Sidecar, phase: Phase, held: list[socket.socket], seconds: float, keep_sending: bytes | None
) -> int:
    """Keep the connections open for `seconds`, polling /health; returns how many the server closed."""
    open_ = set(held)
    closed = 0
    next_drip = time.monotonic()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        _observe(sidecar, phase)
        for sock in list(open_):
            if _closed_by_peer(sock):
                open_.discard(sock)
                sock.close()
                closed += 1
        if keep_sending is not None and time.monotonic() >= next_drip:
            next_drip += 1.0
            for sock in open_:
                try:
                    sock.send(keep_sending)
                except OSError:
                    pass
        time.sleep(POLL_S)
    for sock in open_:
        sock.close()
    return closed


def _observe(sidecar: Sidecar, phase: Phase) -> None:
    began = time.perf_counter()
    try:
        connection = http.client.HTTPConnection("127.0.0.1", sidecar.port, timeout=10)
        connection.request("GET", "/health")
        ok = connection.getresponse().status == 200
        connection.close()
    except OSError:
        ok = False
    if ok:
        phase.health_ms.append((time.perf_counter() - began) * 1000)
    else:
        phase.health_failed += 1
    process = psutil.Process(sidecar.process.pid)
    established = [
        c for c in process.net_connections(kind="tcp")
        if c.laddr and c.laddr.port == sidecar.port and c.status == psutil.CONN_ESTABLISHED
    ]
    phase.most_held = max(phase.most_held, len(established))
    phase.most_fds = max(phase.most_fds, process.num_fds())


def _closed_by_peer(sock: socket.socket) -> bool:
    # Read whatever came (a 408 may arrive before the close) until the socket would block or ends.
    try:
        while sock.recv(4096, socket.MSG_DONTWAIT):
            pass
    except BlockingIOError:
        return False
    except OSError:
        return True
    return True


def _connect(port: int, first_bytes: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(first_bytes)
    return sock


def _start(work: Path, args: argparse.Namespace) -> Sidecar:
    model = write_tiny_model(work / "model")
    adapter = write_tiny_adapter(work / "adapter", model)
    layout = RootLayout.of(work / "root")
    port = _free_port()
    save_settings(layout.root, SidecarSettings(
        model_path=str(model), model_id="flood", adapter_path=str(adapter), port=port, state_dir=str(layout.state),
    ))
    layout.logs.mkdir(parents=True)
    argv = [
        sys.executable, "-m", "installer", "serve", "--root", str(layout.root),
        "--max-connections", str(args.max_connections), "--header-timeout", str(args.header_timeout),
        "--body-timeout", str(args.body_timeout),
    ]
    with layout.stdout_log.open("ab") as out, layout.stderr_log.open("ab") as err:
        process = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
    sidecar = Sidecar(process, port, layout)
    _wait(lambda: _health_status(port) == 200, process, layout)
    return sidecar


def _wait(ready: Callable[[], bool], process: subprocess.Popen[bytes], layout: RootLayout) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not ready():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"serve did not start:\n{layout.stderr_log.read_text()[-2000:]}")
        time.sleep(0.5)


def _health_status(port: int) -> int | None:
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        connection.request("GET", "/health")
        return connection.getresponse().status
    except OSError:
        return None


def _raise_own_file_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=2100, help="half-request connections (phase 1)")
    parser.add_argument("--slow", type=int, default=200, help="connections in phases 2 and 3")
    parser.add_argument("--max-connections", type=int, default=1000, help="serve --max-connections")
    parser.add_argument("--header-timeout", type=float, default=10.0, help="serve --header-timeout")
    parser.add_argument("--body-timeout", type=float, default=60.0, help="serve --body-timeout")
    parser.add_argument("--json", action="store_true", help="print JSON on one line")
    return parser


if __name__ == "__main__":
    raise SystemExit(main())
