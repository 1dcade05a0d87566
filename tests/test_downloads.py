"""The real download code (huggingface_hub) against a local fake Hub: plans, consent, resume, validation."""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub.constants
import numpy as np
import pytest
from fake_hub import FakeHub
from typer.testing import CliRunner

from common.layout import RootLayout
from common.ports import free_port
from common.receipt import read_receipt, verify_receipt
from installer.cli import app
from installer.downloads import DownloadError, download, plan_downloads
from presets.catalog import Source, load_preset, with_overrides
from sidecar.testing.tiny_model import write_tiny_adapter, write_tiny_model

MODEL_REPO = "fake-org/tiny-qwen3-mlx"
NPZ_ADAPTER_REPO = "fake-org/tiny-delta-mem-mlx"
PT_ADAPTER_REPO = "fake-org/tiny-delta-mem-pt"
MODEL_FILES = {
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
}

runner = CliRunner()


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny model, its adapter as .npz and as .pt, generated once for this module."""
    base = tmp_path_factory.mktemp("sources")
    model = write_tiny_model(base / "model")
    return {
        "model": model,
        "npz": write_tiny_adapter(base / "npz", model),
        "pt": write_tiny_adapter(base / "pt", model, write_npz=False, write_pt=True),
    }


@pytest.fixture
def hub(sources: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """The fake Hub serving the tiny model (plus files an install must skip) and both adapters."""
    with FakeHub() as fake:
        model = fake.add_dir(MODEL_REPO, sources["model"])
        model.files["README.md"] = b"# tiny\n"
        model.files[".gitattributes"] = b"*.safetensors filter=lfs\n"
        model.files["convert.py"] = b"print('never downloaded')\n"
        fake.add_dir(NPZ_ADAPTER_REPO, sources["npz"])
        fake.add_dir(PT_ADAPTER_REPO, sources["pt"])
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        # huggingface_hub reads these once at import; the test sets them afresh.
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_ENDPOINT", fake.endpoint)
        yield fake


def _preset(adapter_repo: str | None = NPZ_ADAPTER_REPO):
    return with_overrides(
        load_preset("custom"),
        model_repo=MODEL_REPO,
        adapter_repo=adapter_repo,
        model_id="tiny",
        min_memory_gb=1,
    )


def _install_args(root: Path, adapter_repo: str, *extra: str) -> list[str]:
    return [
        "install-sidecar-only",
        "--root",
        str(root),
        "--preset",
        "custom",
        "--model-repo",
        MODEL_REPO,
        "--adapter-repo",
        adapter_repo,
        "--model-id",
        "tiny",
        "--min-memory-gb",
        "1",
        "--port",
        str(free_port()),
        "--supervisor",
        "process",
        *extra,
    ]


def test_plan_lists_exactly_the_needed_files_with_hub_sizes(
    hub: FakeHub, sources: dict[str, Path], tmp_path: Path
) -> None:
    root = tmp_path / "root"
    plan = plan_downloads(_preset(), root)
    model, adapter = plan.repos
    assert {f.name for f in model.files} == MODEL_FILES
    assert {f.name: f.size for f in model.files} == {
        n: (sources["model"] / n).stat().st_size for n in MODEL_FILES
    }
    assert {f.name for f in adapter.files} == {"delta_mem_config.json", "delta_mem_adapter_mlx.npz"}
    assert model.commit == hub.repos[MODEL_REPO].commit
    assert model.dest == RootLayout.of(root).model_dir(MODEL_REPO)
    assert plan.missing_bytes == plan.total_bytes > 0
    assert plan.fits
    assert not root.exists(), "planning must not write anything"
    assert not [r for r in hub.requests if "/resolve/" in r[1]], "planning must not download"


def test_pt_only_adapter_repo_plans_the_pt_file(hub: FakeHub, tmp_path: Path) -> None:
    adapter = plan_downloads(_preset(PT_ADAPTER_REPO), tmp_path / "root").repos[1]
    assert [f.name for f in adapter.files] == ["delta_mem_config.json", "delta_mem_adapter.pt"]


def test_consent_refused_downloads_and_writes_nothing(hub: FakeHub, tmp_path: Path) -> None:
    root = tmp_path / "root"
    hf_home = Path(huggingface_hub.constants.HF_HOME)
    before = sorted(hf_home.rglob("*")) if hf_home.exists() else []
    result = runner.invoke(app, ["install-sidecar", *_install_args(root, NPZ_ADAPTER_REPO)[1:]])
    assert result.exit_code == 1
    assert "--yes" in result.output
    assert "Download plan" in result.output and "model.safetensors" in result.output
    assert not root.exists()
    assert not [r for r in hub.requests if "/resolve/" in r[1]]
    assert (sorted(hf_home.rglob("*")) if hf_home.exists() else []) == before


def test_install_downloads_only_needed_files_and_converts_the_pt_adapter(
    hub: FakeHub, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    result = runner.invoke(app, _install_args(root, PT_ADAPTER_REPO, "--yes"))
    assert result.exit_code == 0, result.output
    layout = RootLayout.of(root)
    model_dir = layout.model_dir(MODEL_REPO)
    assert {p.name for p in model_dir.iterdir() if p.is_file()} == MODEL_FILES
    adapter_dir = layout.adapter_dir(PT_ADAPTER_REPO)
    assert (adapter_dir / "delta_mem_adapter_mlx.npz").is_file()
    receipt = read_receipt(root)
    assert receipt is not None and receipt.model_source == f"{MODEL_REPO}@{hub.repos[MODEL_REPO].commit}"
    assert {Path(f.path).name for f in receipt.files} >= MODEL_FILES | {"delta_mem_adapter_mlx.npz"}
    assert verify_receipt(root) == []
    settings = json.loads(layout.settings.read_text())
    assert settings["model_path"] == str(model_dir) and settings["adapter_path"] == str(adapter_dir)


def test_interrupted_download_resumes_with_a_range_request(
    hub: FakeHub, sources: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Real weights span many 10 MB read chunks; shrink the chunk so the tiny file does too.
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 64 * 1024)
    hub.cut_once.add((MODEL_REPO, "model.safetensors"))
    plan = plan_downloads(_preset(), tmp_path / "root")
    download(plan, progress=False)
    target = plan.repos[0].dest / "model.safetensors"
    original = (sources["model"] / "model.safetensors").read_bytes()
    assert target.read_bytes() == original
    ranges = hub.downloads_of(MODEL_REPO, "model.safetensors")
    assert ranges[0] is None and len(ranges) == 2
    assert ranges[1] is not None and int(ranges[1].removeprefix("bytes=").rstrip("-")) > 0


def test_rerun_reuses_finished_files(hub: FakeHub, tmp_path: Path) -> None:
    root = tmp_path / "root"
    download(plan_downloads(_preset(), root), progress=False)
    gets = len([r for r in hub.requests if r[0] == "GET" and "/resolve/" in r[1]])
    again = plan_downloads(_preset(), root)
    assert again.missing_bytes == 0 and all(f.present for r in again.repos for f in r.files)
    download(again, progress=False)
    assert len([r for r in hub.requests if r[0] == "GET" and "/resolve/" in r[1]]) == gets


def test_a_damaged_local_file_is_fetched_again(
    hub: FakeHub, sources: dict[str, Path], tmp_path: Path
) -> None:
    root = tmp_path / "root"
    download(plan_downloads(_preset(), root), progress=False)
    target = RootLayout.of(root).model_dir(MODEL_REPO) / "model.safetensors"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF  # same size, different content
    target.write_bytes(bytes(data))
    download(plan_downloads(_preset(), root), progress=False)
    assert target.read_bytes() == (sources["model"] / "model.safetensors").read_bytes()


def _npz_bytes(tensors: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **tensors)
    return buffer.getvalue()


@pytest.mark.parametrize("damage", ["truncated", "missing tensor"])
def test_partial_or_corrupted_adapter_fails_validation_naming_the_file(
    hub: FakeHub, sources: dict[str, Path], tmp_path: Path, damage: str
) -> None:
    good = (sources["npz"] / "delta_mem_adapter_mlx.npz").read_bytes()
    if damage == "truncated":
        bad = good[: len(good) // 2]
    else:
        with np.load(io.BytesIO(good)) as loaded:
            tensors = {
                k: loaded[k] for k in loaded.files if not k.endswith("layers.1.self_attn.memory_k_proj")
            }
        bad = _npz_bytes(tensors)
    hub.repos[NPZ_ADAPTER_REPO].files["delta_mem_adapter_mlx.npz"] = bad
    root = tmp_path / "root"
    result = runner.invoke(app, _install_args(root, NPZ_ADAPTER_REPO, "--yes"))
    assert result.exit_code == 1
    assert "delta_mem_adapter_mlx.npz" in result.output
    assert "adapter" in result.output.splitlines()[-1]
    assert read_receipt(root) is None
    assert verify_receipt(root)  # the root reports itself as not installed


def test_gated_repo_says_how_to_get_access(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    hub.repos[MODEL_REPO].gated = True
    plan = plan_downloads(_preset(), tmp_path / "root")
    with pytest.raises(DownloadError, match="gated.*HF_TOKEN"):
        download(plan, progress=False)


def test_unknown_repo_and_revision_are_named(hub: FakeHub, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="fake-org/nope was not found"):
        plan_downloads(
            with_overrides(load_preset("custom"), model_repo="fake-org/nope", model_id="x"), tmp_path
        )
    bad_revision = dataclasses.replace(_preset(), model=Source(repo=MODEL_REPO, revision="v9"))
    with pytest.raises(DownloadError, match="no revision 'v9'"):
        plan_downloads(bad_revision, tmp_path)


def test_offline_mode_is_refused_before_any_request(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DownloadError, match="HF_HUB_OFFLINE"):
        plan_downloads(_preset(), tmp_path)
    assert hub.requests == []


def test_not_enough_disk_stops_before_consent(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=2048, used=1024, free=1024))
    root = tmp_path / "root"
    result = runner.invoke(app, _install_args(root, NPZ_ADAPTER_REPO, "--yes"))
    assert result.exit_code == 1
    assert "disk" in result.output and "free some space" in result.output
    assert not root.exists()
