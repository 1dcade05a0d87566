"""One server per state dir (issue 22 F9a): a second `serve` on a state dir in use exits at once, before
loading anything, with one line naming the server that holds it, and EX_TEMPFAIL (75): it may start
once that one has exited, as when a supervisor restarts the sidecar before the old process is gone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from server_process import MODEL, _free_port, start_server, stop_server

from common.exit_codes import STATE_DIR_IN_USE
from sidecar.server.state_dir_lock import StateDirBusyError, hold_state_dir


def test_a_held_state_dir_is_refused_naming_its_holder_and_free_again_once_released(tmp_path: Path) -> None:
    held = hold_state_dir(tmp_path / "state", 8765)
    try:
        holder = rf"in use by another server \(pid {os.getpid()}, port 8765, since "
        with pytest.raises(StateDirBusyError, match=holder):
            hold_state_dir(tmp_path / "state", 8766)
    finally:
        os.close(held)  # as when the holder exits, however it exits
    os.close(hold_state_dir(tmp_path / "state", 8766))


@pytest.mark.e2e
def test_a_second_serve_on_the_same_state_dir_exits_at_once_with_one_line_naming_the_first(
    tiny_model_dir: Path, tiny_adapter_dir: Path, tmp_path: Path
) -> None:
    first = start_server(tiny_model_dir, tiny_adapter_dir, tmp_path)
    try:
        second = subprocess.run(
            [
                sys.executable, "-c", "from installer.cli import main; main()", "serve",
                "--model", str(tiny_model_dir), "--adapter", str(tiny_adapter_dir), "--model-id", MODEL,
                "--port", str(_free_port()), "--state-dir", str(tmp_path / "state"),
            ],
            capture_output=True, text=True, timeout=120,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "DELTA_MEM_MLX_ROOT": str(tmp_path / "root2")},
        )  # fmt: skip
    finally:
        stop_server(first)
    assert second.returncode == STATE_DIR_IN_USE == 75
    errors = [line for line in second.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and f"in use by another server (pid {first.process.pid}, port " in errors[0]
    assert "loading" not in second.stderr.lower()
