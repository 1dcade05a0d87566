"""Real OpenClaw 2026.9.6 starts the sidecar through `localService`, stops it when idle, and the next
turn starts it again and reads the session back from the disk cache.

`openclaw agent --local` does start localService servers, but it is one-shot: when it exits its
exit handler kills the server it started (SIGKILL), so `idleStopMs` never gets a chance. The
smallest real OpenClaw that stops a server when idle is the Gateway (`openclaw gateway run`), with
`openclaw agent` turns sent through it. Node 24 and OpenClaw come from test_openclaw_e2e.py's
fixtures (npm, cached in .cache/openclaw-e2e/).
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from server_process import wait_until
from test_openclaw_e2e import OpenClaw, apply_provider_config, home, openclaw, openclaw_env  # noqa: F401
from typer.testing import CliRunner

from common.layout import RootLayout
from common.ports import free_port
from installer.cli import app
from plugin_tools.payloads import PROVIDER_ID
from sidecar.testing.qwen_vocab import QWEN_VOCAB_SIZE
from sidecar.testing.tiny_model import write_tiny_adapter, write_tiny_model
from supervisors import supervisor_for_root

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

MODEL_ID = "tiny-delta"
MAX_TOKENS = 8
IDLE_STOP = "3s"
DEADLINE_S = 120.0
_CACHED = re.compile(r"(\d+) prompt tokens \((\d+) cached\)")


@pytest.fixture(scope="module")
def qwen_model(qwen_vocab_tokenizer: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A one-layer tiny model with Qwen's real vocabulary, and its adapter.

    Qwen's vocabulary makes OpenClaw's system prompt ~13k tokens, as for the real model (the tiny
    tokenizer's ~32k would not fit the context window the install announces). One layer, because then
    a prefill step evaluates only K/V and the δ-state: attention runs for the prompt's last chunk alone
    (see `tiny_one_layer_model_dir`), seconds where two layers take a minute.
    """
    base = tmp_path_factory.mktemp("qwen-vocab-model")
    model = write_tiny_model(
        base / "model", tokenizer_json=qwen_vocab_tokenizer, vocab_size=QWEN_VOCAB_SIZE, num_layers=1
    )
    return {"model": model, "adapter": write_tiny_adapter(base / "adapter", model)}


@pytest.fixture
def root(tmp_path: Path, qwen_model: dict[str, Path]) -> Iterator[Path]:
    """A root installed with --supervisor openclaw (nothing started); any sidecar of it stopped after the test."""
    path = tmp_path / "root"
    result = CliRunner().invoke(app, [
        "install-sidecar", "--root", str(path), "--preset", "custom", "--model-path", str(qwen_model["model"]),
        "--adapter-path", str(qwen_model["adapter"]), "--model-id", MODEL_ID, "--min-memory-gb", "1",
        "--port", str(free_port()), "--supervisor", "openclaw", "--yes",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    yield path
    supervisor_for_root(path).uninstall()


@pytest.fixture
def gateway(openclaw: OpenClaw, home: Path, root: Path) -> Iterator[Path]:  # noqa: F811
    """`openclaw gateway run` on a free loopback port, with the provider block applied; yields its log."""
    config = home / ".openclaw" / "openclaw.json"
    port = free_port()
    config.write_text(json.dumps({"gateway": {"mode": "local", "port": port, "bind": "loopback",
                                              "auth": {"mode": "none"}}}), encoding="utf-8")  # fmt: skip
    apply_provider_config(config, "--root", str(root), "--max-tokens", str(MAX_TOKENS), "--idle-stop", IDLE_STOP)
    assert openclaw.json(["config", "validate", "--json"], home)["valid"] is True
    log = home / "gateway.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [str(openclaw.node), str(openclaw.entry), "gateway", "run"], stdout=sink, stderr=subprocess.STDOUT,
            env=openclaw_env(home, openclaw.node), cwd=home, start_new_session=True,
        )  # fmt: skip
    try:
        wait_until(lambda: _listening(port) or process.poll() is not None, "the gateway's start", 300)
        assert process.poll() is None, log.read_text(errors="replace")[-3000:]
        yield log
    finally:
        process.send_signal(signal.SIGTERM)  # it stops the sidecar it started on its way out
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _turn(openclaw: OpenClaw, home: Path, message: str) -> dict[str, Any]:  # noqa: F811
    """One real `openclaw agent` turn through the gateway; OpenClaw's agent metadata for it."""
    envelope = openclaw.json(["agent", "--agent", "main", "-m", message, "--json"], home, timeout=1500)
    meta = envelope["result"]["meta"]
    assert meta.get("aborted") is False, json.dumps(envelope)[:3000]
    agent = meta["agentMeta"]
    assert (agent["provider"], agent["model"]) == (PROVIDER_ID, MODEL_ID), agent
    return agent


def _sidecar_pid(root: Path) -> int | None:
    status = supervisor_for_root(root).status()
    return status.pid if status.state == "running" else None


def test_openclaw_starts_the_sidecar_stops_it_when_idle_and_the_next_turn_reads_the_disk(
    openclaw: OpenClaw, home: Path, root: Path, gateway: Path  # noqa: F811
) -> None:
    assert _sidecar_pid(root) is None  # the install started nothing

    first = _turn(openclaw, home, "Hello! My cat is called Miso.")
    started = _sidecar_pid(root)
    assert started is not None, "OpenClaw's localService did not start the sidecar"
    assert "started by OpenClaw" in supervisor_for_root(root).status().detail
    # OpenClaw stops it once no request has come for idleStopMs.
    stopped = lambda: not psutil.pid_exists(started) and _sidecar_pid(root) is None  # noqa: E731
    wait_until(stopped, "OpenClaw's idle stop", DEADLINE_S)
    gateway_log = gateway.read_text(errors="replace")
    assert "stopping local model service: reason=idle" in gateway_log

    second = _turn(openclaw, home, "What is my cat called?")
    assert first["sessionId"] == second["sessionId"]
    assert gateway.read_text(errors="replace").count(f"{PROVIDER_ID} local service ready") == 2
    usage = second["usage"]
    # OpenClaw counts the prompt tokens the sidecar read from its cache as cacheRead.
    assert usage["cacheRead"] >= 0.95 * (usage["input"] + usage["cacheRead"]), usage
    sidecar_log = RootLayout.of(root).stderr_log.read_text(errors="replace")
    prompt, cached = (int(n) for n in _CACHED.findall(sidecar_log)[-1])
    assert cached >= 0.95 * prompt, (prompt, cached)
    assert sidecar_log.count("model tiny-delta ready in") == 2  # two processes, each loaded once
