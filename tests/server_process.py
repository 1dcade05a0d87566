"""A real `delta-mem-mlx serve` process for end-to-end tests: start it, wait for health, stop it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

MODEL = "delta-mem-tiny-e2e"
KEY = "e2e-key"
STARTUP_TIMEOUT_S = 180.0


@dataclass
class Server:
    """A running sidecar process."""

    process: subprocess.Popen[bytes]
    base_url: str
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(model_dir: Path, adapter_dir: Path, work: Path, *extra: str) -> Server:
    """Start `serve` and wait (with a deadline) until /health says ok."""
    port = _free_port()
    log = work / "serve.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DELTA_MEM_MLX_ROOT": str(work / "root")}
    argv = [
        sys.executable, "-c", "from installer.cli import main; main()", "serve",
        "--model", str(model_dir), "--adapter", str(adapter_dir), "--model-id", MODEL,
        "--port", str(port), "--state-dir", str(work / "state"), "--api-key", KEY,
        "--context-window", "2048", "--max-sessions", "8", *extra,
    ]
    with log.open("wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    server = Server(process, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        if process.poll() is not None:
            pytest.fail(f"serve exited with {process.returncode}:\n{server.log_text()[-3000:]}")
        try:
            health = httpx.get(f"{server.base_url}/health", headers={"Authorization": f"Bearer {KEY}"}, timeout=5)
            if health.status_code == 200:
                return server
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"serve was not healthy within {STARTUP_TIMEOUT_S} s:\n{server.log_text()[-3000:]}")
        time.sleep(0.2)


def stop_server(server: Server) -> int:
    """SIGTERM, then wait for the exit code (killing after a deadline)."""
    server.process.send_signal(signal.SIGTERM)
    try:
        return server.process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()
        pytest.fail("serve did not exit within 60 s of SIGTERM")


def wait_until(condition: Callable[[], bool], what: str, deadline_s: float) -> None:
    """Poll `condition` until it holds; fail naming `what` once `deadline_s` has passed."""
    deadline = time.monotonic() + deadline_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {deadline_s} s"
        time.sleep(0.1)

