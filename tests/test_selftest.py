"""`delta-mem-mlx selftest`: the offline end-to-end check passes here, cleans up, and fails loudly."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import psutil
import pytest
from typer.testing import CliRunner

from installer.cli import app
from installer.commands import selftest as selftest_module
from installer.sidecar_client import ChatReply
from supervisors.process import live_children

runner = CliRunner()


@pytest.fixture
def temp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where the selftest makes its temporary root."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def _alive_children() -> list[psutil.Process]:
    return live_children(psutil.Process(), recursive=True)


@pytest.mark.e2e
def test_selftest_passes_and_cleans_up(temp_dir: Path) -> None:
    result = runner.invoke(app, ["selftest"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "x-delta-attention-state-count: 1" in out.lower()
    assert "x-delta-attention-state-source: request" in out.lower()
    block = json.loads(out[out.index("{") : out.rindex("}") + 1])
    provider = block["models"]["providers"]["delta-mem-mlx"]
    assert provider["api"] == "openai-completions"
    assert provider["baseUrl"].startswith("http://127.0.0.1:") and provider["baseUrl"].endswith("/v1")
    assert provider["models"][0]["id"] == "delta-mem-tiny-selftest"
    assert out.rstrip().endswith("selftest passed.")
    assert list(temp_dir.iterdir()) == []
    assert _alive_children() == []


@pytest.mark.e2e
def test_selftest_keep_leaves_the_root_but_stops_the_sidecar(temp_dir: Path) -> None:
    result = runner.invoke(app, ["selftest", "--keep"])
    assert result.exit_code == 0, result.output
    (kept,) = temp_dir.iterdir()
    assert (kept / "root" / "receipt.json").is_file()
    assert not (kept / "root" / "run" / "sidecar.pid.json").exists()
    assert _alive_children() == []


@pytest.mark.e2e
def test_selftest_fails_with_exit_1_and_still_cleans_up(
    temp_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_memory = ChatReply("", 0.1, 0.2, 5, 1, 0, "stop", {"x-delta-attention-state-count": "0"})
    monkeypatch.setattr(selftest_module, "stream_chat", lambda settings, prompt, snippets: no_memory)
    result = runner.invoke(app, ["selftest"])
    assert result.exit_code == 1
    assert "selftest failed: the sidecar reported 0 memory snippets instead of 1" in result.output
    assert "selftest passed" not in result.output
    assert list(temp_dir.iterdir()) == []
    assert _alive_children() == []
