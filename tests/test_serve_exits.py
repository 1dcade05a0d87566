"""How `serve` ends when it cannot serve: statuses a supervisor can act on, nothing left running.

- a busy port: PORT_IN_USE, said in one line, before anything loads (the port race's loser used to
  die by SIGABRT with the model-load thread still running);
- an unusable state dir: CONFIG_ERROR before binding;
- a model that fails to load: the process exits (it used to serve 503 for ever).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from fake_engine import FakeEngine
from reliability import record_figures

from common.exit_codes import CONFIG_ERROR, PORT_IN_USE
from common.settings import SidecarSettings
from sidecar.delta.adapter_files import AdapterError
from sidecar.server.app import create_app
from sidecar.server.http_server import LOAD_FAILED, exit_status_for


def serve(case: str, model: Path, adapter: Path, port: int, *extra: str) -> subprocess.CompletedProcess[str]:
    argv = [
        sys.executable, "-c", "from installer.cli import main; main()", "serve", "--model", str(model),
        "--adapter", str(adapter), "--model-id", "tiny", "--port", str(port), *extra,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    began = time.monotonic()
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    elapsed = round(time.monotonic() - began, 2)
    record_figures(f"serve_exit_{case}", {"status": result.returncode, "seconds_to_exit": elapsed})
    return result


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_busy_port_exits_port_in_use_before_loading(tiny_model_dir: Path, tiny_adapter_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = serve("busy_port", tiny_model_dir, tiny_adapter_dir, port)
    assert result.returncode == PORT_IN_USE, result.stderr[-2000:]
    assert f"Error: port {port} is in use" in result.stderr
    assert "startup" not in result.stderr and "fingerprint" not in result.stderr  # nothing started


def test_a_state_dir_that_is_a_file_exits_config_error_before_binding(
    tiny_model_dir: Path, tiny_adapter_dir: Path, tmp_path: Path
) -> None:
    not_a_dir = tmp_path / "state"
    not_a_dir.write_text("a file where the state dir should be")
    result = serve("state_dir_is_a_file", tiny_model_dir, tiny_adapter_dir, free_port(), "--state-dir", str(not_a_dir))
    assert result.returncode == CONFIG_ERROR, result.stderr[-2000:]
    assert f"the state dir {not_a_dir} is not a directory" in result.stderr
    assert "listening on" not in result.stderr
    assert not_a_dir.read_text() == "a file where the state dir should be"


def test_a_model_that_fails_to_load_exits_instead_of_serving_503(
    tiny_model_dir: Path, tiny_adapter_dir: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "model"
    shutil.copytree(tiny_model_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "model_type": "no_such_architecture"}))
    result = serve("model_fails_to_load", broken, tiny_adapter_dir, free_port())
    assert result.returncode == CONFIG_ERROR, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert "the model failed to load" in last and "no_such_architecture" in last


def test_load_failures_that_a_restart_may_fix_exit_1() -> None:
    assert exit_status_for(AdapterError("the adapter was made for another model")) == CONFIG_ERROR
    assert exit_status_for(FileNotFoundError("config.json")) == CONFIG_ERROR
    assert exit_status_for(MemoryError()) == LOAD_FAILED == 1
    assert exit_status_for(RuntimeError("[metal] command buffer failed")) == LOAD_FAILED


def test_stopping_while_the_model_loads_waits_for_it_and_closes_the_engine() -> None:
    release = threading.Event()
    engine = FakeEngine(model_id="m")

    def slow_loader(_: SidecarSettings) -> FakeEngine:
        release.wait(30)
        return engine

    app = create_app(SidecarSettings(model_path="/models/m", model_id="m"), load_engine=slow_loader)

    async def start_then_stop_while_loading() -> bool:
        lifespan = app.router.lifespan_context(app)
        await lifespan.__aenter__()
        stopping = asyncio.create_task(lifespan.__aexit__(None, None, None))
        await asyncio.sleep(0)  # one turn of the loop: the shutdown runs up to its first wait
        waited = not stopping.done()
        release.set()
        await asyncio.wait_for(stopping, 30)
        return waited

    assert asyncio.run(start_then_stop_while_loading()), "shutdown did not wait for the load in progress"
    assert engine.closed, "an engine that finished loading during shutdown was left running"
