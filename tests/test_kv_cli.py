"""The KV budget and precision through the CLI: install writes them, start-sidecar changes them,
serve takes them, doctor and status show them, and the running sidecar reports them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import sidecar.http_server
from common.kv_budget import GIB, kv_budget, model_weight_bytes
from common.layout import RootLayout
from common.ports import free_port
from common.receipt import read_receipt
from common.settings import load_settings
from installer.cli import app
from sidecar.tiny_model import write_tiny_adapter, write_tiny_model
from supervisors import supervisor_for_root

runner = CliRunner()


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
    monkeypatch.setattr(sidecar.http_server, "run_server", lambda settings, **kw: seen.append(settings) or 0)
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
        sessions = {k: v["sessions"] for k, v in report["memory"]["openclaw_sessions"].items()}
        assert sessions == {"none": 1, "8": 4, "4": 8}
        assert report["memory"]["kv_budget_bytes"] == 6 * GIB and report["memory"]["context_window"] == 65536
        assert "1 float, 4 at 8-bit, 8 at 4-bit; the preset uses 8-bit KV here" in check["detail"]


def _no_hub(*args: Any, **kwargs: Any) -> Any:
    from installer.downloads import DownloadError

    raise DownloadError("no Hub in this test")
