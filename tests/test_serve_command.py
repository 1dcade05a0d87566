"""`delta-mem-mlx serve`: settings from flags or a root, refusals, and what reaches uvicorn."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import sidecar.server.http_server
from common.exit_codes import CONFIG_ERROR
from common.settings import QmdSettings, SidecarSettings, save_settings
from installer.cli import app as cli

runner = CliRunner()


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Replaces the server runner; each call's settings and connection limits are recorded."""
    calls: list[dict[str, Any]] = []

    def fake_run(settings: SidecarSettings, **options: Any) -> int:
        calls.append({"settings": settings, "host": settings.host, "port": settings.port, **options})
        return 0

    monkeypatch.setattr(sidecar.server.http_server, "run_server", fake_run)
    return calls


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    model, adapter = tmp_path / "model", tmp_path / "adapter"
    model.mkdir()
    adapter.mkdir()
    return model, adapter


def invoke(*args: str, env: dict[str, str] | None = None) -> Any:
    return runner.invoke(cli, ["serve", *args], env=env)


def test_flags_build_the_settings(started: list[dict[str, Any]], dirs: tuple[Path, Path]) -> None:
    model, adapter = dirs
    result = invoke(
        "--model", str(model), "--adapter", str(adapter), "--model-id", "delta-mem-test", "--port", "9001",
        "--context-window", "16384", "--max-sessions", "4", "--attention-state-source", "qmd",
        "--qmd-bin", "/opt/qmd", "--qmd-mode", "search", "--qmd-limit", "3", "--qmd-timeout", "2.5",
        "--qmd-collection", "notes", "--write-policy", "skip-system", "--max-batch", "4", "--prefill-chunk", "256",
        "--no-share-prefix",
    )
    assert result.exit_code == 0, result.output
    [call] = started
    settings: SidecarSettings = call["settings"]
    assert (call["host"], call["port"]) == ("127.0.0.1", 9001)
    assert settings.model_path == str(model) and settings.adapter_path == str(adapter)
    assert (settings.model_id, settings.context_window, settings.max_sessions) == ("delta-mem-test", 16384, 4)
    assert settings.attention_state_source == "qmd" and settings.write_policy == "skip-system"
    assert (settings.max_batch, settings.prefill_chunk, settings.share_prefix) == (4, 256, False)
    assert settings.qmd == QmdSettings(bin="/opt/qmd", mode="search", limit=3, timeout=2.5, collection="notes")
    assert call["limits"].max_connections > 0 and call["limits"].header_timeout_s > 0
    assert call["shutdown_grace_s"] > 0


def test_root_settings_with_flags_on_top(
    started: list[dict[str, Any]], dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    model, adapter = dirs
    root = tmp_path / "root"
    file_settings = SidecarSettings(model_path=str(model), model_id="from-file", adapter_path=str(adapter), port=9100)
    save_settings(root, file_settings)
    result = invoke("--root", str(root), "--port", "9200", "--no-adapter")
    assert result.exit_code == 0, result.output
    settings = started[0]["settings"]
    assert (settings.model_id, settings.port, settings.adapter_path) == ("from-file", 9200, None)
    assert settings.share_prefix  # on by default


def test_default_root_is_used_without_model_flags(
    started: list[dict[str, Any]], dirs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    model, _ = dirs
    root = tmp_path / "default-root"
    monkeypatch.setenv("DELTA_MEM_MLX_ROOT", str(root))
    missing = invoke()
    assert missing.exit_code == CONFIG_ERROR and "sidecar.json" in missing.output
    save_settings(root, SidecarSettings(model_path=str(model), model_id="default-root-model"))
    assert invoke().exit_code == 0
    assert started[0]["settings"].model_id == "default-root-model"


def test_non_loopback_without_key_is_refused(started: list[dict[str, Any]], dirs: tuple[Path, Path]) -> None:
    model, _ = dirs
    result = invoke("--model", str(model), "--no-adapter", "--model-id", "m", "--host", "0.0.0.0")
    assert result.exit_code == CONFIG_ERROR
    assert "without an API key" in result.output and "--api-key" in result.output
    assert "Traceback" not in result.output
    assert started == []


def test_non_loopback_with_key_from_env(started: list[dict[str, Any]], dirs: tuple[Path, Path]) -> None:
    model, _ = dirs
    result = invoke(
        "--model", str(model), "--no-adapter", "--model-id", "m", "--host", "0.0.0.0",
        env={"DELTA_MEM_MLX_API_KEY": "s3cret"},
    )
    assert result.exit_code == 0, result.output
    assert started[0]["settings"].api_key == "s3cret" and started[0]["host"] == "0.0.0.0"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "MODEL", "--no-adapter"], "serve needs --model-id"),
        (["--model", "MODEL", "--model-id", "m"], "--adapter PATH or --no-adapter"),
        (["--model", "MODEL", "--model-id", "m", "--adapter", "/nowhere", "--no-adapter"], "not both"),
        (["--model", "MODEL", "--model-id", "m", "--adapter", "/nowhere/adapter"], "directory /nowhere/adapter"),
        (["--model", "MODEL", "--model-id", "m", "--no-adapter", "--attention-state-source", "magic"],
         "attention_state_source"),
        (["--model", "MODEL", "--model-id", "m", "--no-adapter", "--port", "70000"], "port 70000"),
        (["--model", "MODEL", "--model-id", "m", "--no-adapter", "--log-level", "loud"], "--log-level"),
        (["--model", "MODEL", "--model-id", "m", "--no-adapter", "--max-batch", "0"], "max_batch must be in 1..64"),
        (["--model", "MODEL", "--model-id", "m", "--no-adapter", "--prefill-chunk", "8"], "prefill_chunk must"),
        (["--model-id", "m", "--no-adapter"], "sidecar.json does not exist"),
    ],
)
def test_bad_flags_get_one_clear_line(
    started: list[dict[str, Any]], dirs: tuple[Path, Path], args: list[str], message: str
) -> None:
    model, _ = dirs
    result = invoke(*(str(model) if arg == "MODEL" else arg for arg in args))
    assert result.exit_code == CONFIG_ERROR, result.output
    assert message in result.output and result.output.startswith("Error: ")
    assert "Traceback" not in result.output
    assert started == []


def test_missing_model_directory(started: list[dict[str, Any]], tmp_path: Path) -> None:
    result = invoke("--model", str(tmp_path / "nope"), "--no-adapter", "--model-id", "m")
    assert result.exit_code == CONFIG_ERROR and "model directory" in result.output and "does not exist" in result.output
