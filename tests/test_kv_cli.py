"""The KV budget and precision, and the disk cache's budget, through the CLI: install writes them,
start-sidecar changes them, serve takes them, doctor and status show them, and the running sidecar
reports them."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

import sidecar.server.http_server
from common.kv_budget import GIB, disk_budget, kv_budget, model_weight_bytes
from common.layout import RootLayout
from common.ports import free_port
from common.receipt import read_receipt
from common.settings import load_settings
from installer.cli import app
from sidecar.testing.tiny_model import write_tiny_adapter, write_tiny_model
from supervisors import supervisor_for_root

runner = CliRunner()
FREE = 40 * GIB


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny models in local folders: head_dim 16 (cannot be quantized in groups of 64) and 64."""
    base = tmp_path_factory.mktemp("tiny")
    narrow = write_tiny_model(base / "narrow")
    wide = write_tiny_model(base / "wide", head_dim=64)
    return {
        "narrow": narrow,
        "narrow_adapter": write_tiny_adapter(base / "narrow_adapter", narrow),
        "wide": wide,
        "wide_adapter": write_tiny_adapter(base / "wide_adapter", wide),
    }


@pytest.fixture
def root(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "root"
    yield path
    supervisor_for_root(path).uninstall()


@pytest.fixture
def sixteen_gb(monkeypatch: pytest.MonkeyPatch) -> int:
    """This machine, as far as the memory plan can tell, is a 16 GB Mac."""
    ram = 16 * GIB
    monkeypatch.setattr("presets.memory_plan.machine_ram", lambda: ram)
    return ram


def _install(root: Path, model: Path, adapter: Path, *extra: str) -> Any:
    return runner.invoke(
        app,
        [
            "install-sidecar-only", "--root", str(root), "--preset", "custom", "--model-path", str(model),
            "--adapter-path", str(adapter), "--model-id", "tiny-kv", "--min-memory-gb", "1",
            "--port", str(free_port()), "--supervisor", "process", *extra,
        ],
    )  # fmt: skip


def test_install_writes_the_budget_the_formula_allows(root: Path, tiny: dict[str, Path], sixteen_gb: int) -> None:
    result = _install(root, tiny["narrow"], tiny["narrow_adapter"])
    assert result.exit_code == 0, result.output
    settings = load_settings(root)
    expected = kv_budget(sixteen_gb, model_weight_bytes(tiny["narrow"])).kv_bytes
    assert settings.max_kv_bytes == expected > 0
    assert settings.kv_bits is None and settings.context_window == 32768  # the custom preset: float, its window
    assert (
        "Memory: KV budget" in result.output
        and "float KV: " in result.output
        and "OpenClaw-sized sessions" in result.output
    )


def test_a_rerun_keeps_a_smaller_budget_and_lowers_a_larger_one(
    root: Path, tiny: dict[str, Path], sixteen_gb: int
) -> None:
    assert _install(root, tiny["narrow"], tiny["narrow_adapter"]).exit_code == 0
    path = RootLayout.of(root).settings
    formula = kv_budget(sixteen_gb, model_weight_bytes(tiny["narrow"])).kv_bytes
    for previous, expected in ((GIB, GIB), (64 * GIB, formula)):
        data = json.loads(path.read_text())
        path.write_text(json.dumps({**data, "max_kv_bytes": previous}))
        assert _install(root, tiny["narrow"], tiny["narrow_adapter"]).exit_code == 0
        assert load_settings(root).max_kv_bytes == expected


def test_install_refuses_kv_bits_the_model_cannot_group(root: Path, tmp_path: Path, tiny: dict[str, Path]) -> None:
    result = _install(root, tiny["narrow"], tiny["narrow_adapter"], "--kv-bits", "8")
    assert result.exit_code == 1
    assert "head_dim 16 is not a multiple of the KV group size 64" in result.output
    assert read_receipt(root) is None and not RootLayout.of(root).settings.exists()
    other = tmp_path / "other"
    bad = _install(other, tiny["narrow"], tiny["narrow_adapter"], "--kv-bits", "5")
    assert bad.exit_code == 1 and "none, 8 or 4" in bad.output and not other.exists()  # refused before writing


@pytest.mark.e2e
def test_start_sidecar_kv_bits_reach_settings_health_and_status(root: Path, tiny: dict[str, Path]) -> None:
    assert _install(root, tiny["wide"], tiny["wide_adapter"], "--kv-bits", "8").exit_code == 0
    assert load_settings(root).kv_bits == 8
    result = runner.invoke(app, ["start-sidecar", "--root", str(root), "--kv-bits", "4", "--kv-group-size", "32"])
    assert result.exit_code == 0, result.output
    settings = load_settings(root)
    assert (settings.kv_bits, settings.kv_group_size) == (4, 32)
    report = json.loads(runner.invoke(app, ["status", "--root", str(root), "--json"]).output)
    memory = report["health"]["body"]["memory"]
    assert (memory["kv_bits"], memory["kv_group_size"]) == ("4", 32)
    assert memory["kv_budget_bytes"] == settings.max_kv_bytes
    assert report["memory"]["kv_bits"] == "4" and report["memory"]["kv_budget_bytes"] == settings.max_kv_bytes
    assert set(report["memory"]["openclaw_sessions"]) == {"none", "8", "4"}
    text = runner.invoke(app, ["status", "--root", str(root)]).output
    assert "memory      KV budget" in text and "4-bit KV:" in text

    result = runner.invoke(app, ["start-sidecar", "--root", str(root), "--kv-bits", "none"])
    assert result.exit_code == 0, result.output
    assert load_settings(root).kv_bits is None


def test_start_sidecar_refuses_a_group_size_the_model_cannot_take(root: Path, tiny: dict[str, Path]) -> None:
    assert _install(root, tiny["narrow"], tiny["narrow_adapter"]).exit_code == 0
    result = runner.invoke(app, ["start-sidecar", "--root", str(root), "--kv-bits", "8"])
    assert result.exit_code == 1 and "head_dim 16 is not a multiple of the KV group size 64" in result.output
    assert load_settings(root).kv_bits is None


def test_serve_takes_kv_flags(monkeypatch: pytest.MonkeyPatch, tiny: dict[str, Path]) -> None:
    seen: list[Any] = []
    monkeypatch.setattr(sidecar.server.http_server, "run_server", lambda settings, **kw: seen.append(settings) or 0)
    args = ["serve", "--model", str(tiny["wide"]), "--no-adapter", "--model-id", "m"]
    result = runner.invoke(app, [*args, "--kv-bits", "4", "--kv-group-size", "32", "--max-kv-bytes", "1000000"])
    assert result.exit_code == 0, result.output
    assert (seen[0].kv_bits, seen[0].kv_group_size, seen[0].max_kv_bytes) == (4, 32, 1000000)
    refused = runner.invoke(app, [*args, "--kv-bits", "2"])
    assert refused.exit_code != 0 and "--kv-bits" in refused.output


@pytest.mark.parametrize(("ram_gb", "state"), [(16, "ok"), (8, "fail")])
def test_doctor_shows_the_budget_and_openclaw_sessions(
    monkeypatch: pytest.MonkeyPatch, ram_gb: int, state: str
) -> None:
    monkeypatch.setattr("presets.memory_plan.machine_ram", lambda: ram_gb * GIB)
    monkeypatch.setattr("installer.downloads.plan_downloads", _no_hub)
    result = runner.invoke(app, ["doctor", "--preset", "qwen3-delta", "--json", "--port", str(free_port())])
    report = json.loads(result.output)
    check = next(c for c in report["checks"] if c["name"] == "kv budget")
    assert check["state"] == state
    if state == "ok":
        rows = report["memory"]["openclaw_sessions"]
        assert {k: v["sessions"] for k, v in rows.items()} == {"none": 7, "8": 16, "4": 34}  # issue 23: ≥ 16 at 8-bit
        assert {k: v["sessions_without_sharing"] for k, v in rows.items()} == {"none": 1, "8": 4, "4": 8}
        assert report["memory"]["kv_budget_bytes"] == 6 * GIB and report["memory"]["context_window"] == 65536
        assert "shared: 7 float, 16 at 8-bit, 34 at 4-bit (copying it per session: 1, 4, 8)" in check["detail"]
        assert "the preset uses 8-bit KV here" in check["detail"]


@pytest.fixture
def forty_gb_free(monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk holding the root has 40 GiB free: the disk cache formula gives a quarter, 10 GiB."""
    real = shutil.disk_usage
    monkeypatch.setattr("shutil.disk_usage", lambda path: real(path)._replace(free=FREE))


def test_the_disk_cache_budget_formula() -> None:
    assert disk_budget(FREE) == 10 * GIB
    assert disk_budget(1000 * GIB) == 64 * GIB  # at most 64 GiB
    assert disk_budget(GIB + 1) == GIB // 4  # rounded down to 256 MiB
    assert disk_budget(GIB - 1) == 0


def test_install_derives_the_disk_cache_budget_from_free_disk_never_above_a_previous_one(
    root: Path, tiny: dict[str, Path], forty_gb_free: None
) -> None:
    result = _install(root, tiny["narrow"], tiny["narrow_adapter"])
    assert result.exit_code == 0, result.output
    assert load_settings(root).max_disk_bytes == 10 * GIB
    assert "Disk cache: 10.00 GiB for sessions' KV across restarts" in result.output
    path = RootLayout.of(root).settings
    path.write_text(json.dumps({**json.loads(path.read_text()), "max_disk_bytes": 2 * GIB}))
    assert _install(root, tiny["narrow"], tiny["narrow_adapter"]).exit_code == 0
    assert load_settings(root).max_disk_bytes == 2 * GIB  # the smaller budget set before stays
    assert _install(root, tiny["narrow"], tiny["narrow_adapter"], "--max-disk-bytes", "0").exit_code == 0
    assert load_settings(root).max_disk_bytes == 0
    refused = _install(root, tiny["narrow"], tiny["narrow_adapter"], "--max-disk-bytes", "-1")
    assert refused.exit_code == 1 and "--max-disk-bytes must be 0" in refused.output


def test_serve_takes_max_disk_bytes(monkeypatch: pytest.MonkeyPatch, tiny: dict[str, Path]) -> None:
    seen: list[Any] = []
    monkeypatch.setattr(sidecar.server.http_server, "run_server", lambda settings, **kw: seen.append(settings) or 0)
    args = ["serve", "--model", str(tiny["narrow"]), "--no-adapter", "--model-id", "m", "--max-disk-bytes", "12345"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert seen[0].max_disk_bytes == 12345


def test_doctor_shows_what_the_disk_cache_would_get(monkeypatch: pytest.MonkeyPatch, forty_gb_free: None) -> None:
    monkeypatch.setattr("installer.downloads.plan_downloads", _no_hub)
    result = runner.invoke(app, ["doctor", "--preset", "custom", "--json", "--port", str(free_port())])
    check = next(c for c in json.loads(result.output)["checks"] if c["name"] == "disk")
    assert "disk cache budget 10.00 GiB" in check["detail"]


@pytest.mark.e2e
def test_start_sidecar_sets_the_disk_cache_budget_status_and_health_show_it_purge_removes_it(
    root: Path, tiny: dict[str, Path]
) -> None:
    assert _install(root, tiny["narrow"], tiny["narrow_adapter"]).exit_code == 0
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
    # A turn leaves chunk files under the root's state dir; uninstall --purge takes them with the root.
    base = f"http://127.0.0.1:{settings.port}/v1"
    headers = {"X-OpenClaw-Session-Key": "purged"}
    body = {"model": "tiny-kv", "messages": [{"role": "user", "content": "hello"}], "max_completion_tokens": 2}
    assert httpx.post(f"{base}/chat/completions", json=body, headers=headers, timeout=60).status_code == 200
    assert httpx.post(f"{base}/session/save", headers=headers, timeout=60).status_code == 200
    assert list((Path(settings.state_dir) / "kv" / "sessions").glob("*/*.safetensors"))
    assert runner.invoke(app, ["uninstall", "--root", str(root), "--purge", "--yes"]).exit_code == 0
    assert not root.exists()


def _no_hub(*args: Any, **kwargs: Any) -> Any:
    from installer.downloads import DownloadError

    raise DownloadError("no Hub in this test")
