"""The disk cache's budget through the CLI: install derives it from the free disk, start-sidecar and
serve take it, doctor and status show it, and the running sidecar reports what it holds."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

import sidecar.http_server
from common.kv_budget import GIB, disk_budget
from common.layout import RootLayout
from common.ports import free_port
from common.settings import load_settings
from installer.cli import app
from supervisors import supervisor_for_root

runner = CliRunner()
FREE = 40 * GIB  # what the fake disk has free: the formula gives a quarter, 10 GiB


@pytest.fixture
def root(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "root"
    yield path
    supervisor_for_root(path).uninstall()


@pytest.fixture
def forty_gb_free(monkeypatch: pytest.MonkeyPatch) -> None:
    real = shutil.disk_usage
    monkeypatch.setattr("shutil.disk_usage", lambda path: real(path)._replace(free=FREE))


def install(root: Path, model: Path, adapter: Path, *extra: str) -> Any:
    return runner.invoke(
        app,
        [
            "install-sidecar-only", "--root", str(root), "--preset", "custom", "--model-path", str(model),
            "--adapter-path", str(adapter), "--model-id", "tiny-disk", "--min-memory-gb", "1",
            "--port", str(free_port()), "--supervisor", "process", *extra,
        ],
    )  # fmt: skip


def test_the_budget_formula() -> None:
    assert disk_budget(FREE) == 10 * GIB
    assert disk_budget(1000 * GIB) == 64 * GIB  # at most 64 GiB
    assert disk_budget(GIB + 1) == GIB // 4  # rounded down to 256 MiB
    assert disk_budget(GIB - 1) == 0


def test_install_derives_the_budget_from_free_disk_and_never_raises_a_previous_one(
    root: Path, tiny_model_dir: Path, tiny_adapter_dir: Path, forty_gb_free: None
) -> None:
    result = install(root, tiny_model_dir, tiny_adapter_dir)
    assert result.exit_code == 0, result.output
    assert load_settings(root).max_disk_bytes == 10 * GIB
    assert "Disk cache: 10.00 GiB for sessions' KV across restarts" in result.output
    path = RootLayout.of(root).settings
    path.write_text(json.dumps({**json.loads(path.read_text()), "max_disk_bytes": 2 * GIB}))
    assert install(root, tiny_model_dir, tiny_adapter_dir).exit_code == 0
    assert load_settings(root).max_disk_bytes == 2 * GIB  # the smaller budget set before stays
    assert install(root, tiny_model_dir, tiny_adapter_dir, "--max-disk-bytes", "0").exit_code == 0
    assert load_settings(root).max_disk_bytes == 0
    refused = install(root, tiny_model_dir, tiny_adapter_dir, "--max-disk-bytes", "-1")
    assert refused.exit_code == 1 and "--max-disk-bytes must be 0" in refused.output


def test_serve_takes_the_flag(monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path) -> None:
    seen: list[Any] = []
    monkeypatch.setattr(sidecar.http_server, "run_server", lambda settings, **kw: seen.append(settings) or 0)
    args = ["serve", "--model", str(tiny_model_dir), "--no-adapter", "--model-id", "m", "--max-disk-bytes", "12345"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert seen[0].max_disk_bytes == 12345


def test_doctor_shows_what_the_disk_cache_would_get(monkeypatch: pytest.MonkeyPatch, forty_gb_free: None) -> None:
    monkeypatch.setattr("installer.downloads.plan_downloads", _no_hub)
    result = runner.invoke(app, ["doctor", "--preset", "custom", "--json", "--port", str(free_port())])
    check = next(c for c in json.loads(result.output)["checks"] if c["name"] == "disk")
    assert "disk cache budget 10.00 GiB" in check["detail"]


@pytest.mark.e2e
def test_start_sidecar_sets_the_budget_and_status_and_health_show_it(
    root: Path, tiny_model_dir: Path, tiny_adapter_dir: Path
) -> None:
    assert install(root, tiny_model_dir, tiny_adapter_dir).exit_code == 0
    result = runner.invoke(app, ["start-sidecar", "--root", str(root), "--max-disk-bytes", str(3 * GIB)])
    assert result.exit_code == 0, result.output
    settings = load_settings(root)
    assert settings.max_disk_bytes == 3 * GIB
    report = json.loads(runner.invoke(app, ["status", "--root", str(root), "--json"]).output)
    assert report["memory"]["disk_cache_bytes"] == 3 * GIB
    health = httpx.get(f"http://127.0.0.1:{settings.port}/health", timeout=30).json()
    assert health["disk_cache"]["enabled"] and health["disk_cache"]["max_bytes"] == 3 * GIB
    assert (Path(settings.state_dir) / "kv" / "sessions").is_dir()  # under the root's state dir
    text = runner.invoke(app, ["status", "--root", str(root)]).output
    assert "disk cache  3.00 GiB for sessions' KV across restarts, 0.0 MiB used" in text
    refused = runner.invoke(app, ["start-sidecar", "--root", str(root), "--max-disk-bytes", "-5"])
    assert refused.exit_code == 1 and "--max-disk-bytes must be 0" in refused.output


def _no_hub(*args: Any, **kwargs: Any) -> Any:
    from installer.downloads import DownloadError

    raise DownloadError("no Hub in this test")
