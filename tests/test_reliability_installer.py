"""Installer faults: downloads cut, corrupted or out of disk; provider-config --apply over random configs.

Downloads run the real code (huggingface_hub) against the local fake Hub of tests/fake_hub.py.
The OpenClaw config property test generates existing configs with hypothesis and checks that
`provider-config --apply` keeps every key, that its backup restores the original byte for byte,
and that a file it cannot parse is left exactly as it was.
"""

from __future__ import annotations

import errno
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import huggingface_hub.file_download
import json5
import pytest
from fake_hub import FakeHub
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability import record_figures
from typer.testing import CliRunner

from common.layout import RootLayout
from common.ports import free_port
from common.receipt import read_receipt, verify_receipt
from installer.cli import app
from plugin_tools.payloads import PROVIDER_ID
from sidecar.testing.tiny_model import write_tiny_adapter, write_tiny_model

MODEL_REPO = "fake-org/tiny-model"
ADAPTER_REPO = "fake-org/tiny-adapter"
runner = CliRunner()


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("sources")
    model = write_tiny_model(base / "model")
    return {"model": model, "adapter": write_tiny_adapter(base / "adapter", model)}


@pytest.fixture
def hub(sources: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    with FakeHub() as fake:
        fake.add_dir(MODEL_REPO, sources["model"])
        fake.add_dir(ADAPTER_REPO, sources["adapter"])
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_ENDPOINT", fake.endpoint)
        yield fake


def install(root: Path) -> Any:
    """`install-sidecar-only` of the fake repos into `root`, consenting up front."""
    args = [
        "install-sidecar-only", "--root", str(root), "--preset", "custom", "--model-repo", MODEL_REPO,
        "--adapter-repo", ADAPTER_REPO, "--model-id", "tiny", "--min-memory-gb", "1", "--port", str(free_port()),
        "--supervisor", "process", "--yes",
    ]  # fmt: skip
    return runner.invoke(app, args)


def error_line(result: Any) -> str:
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    return lines[0]


def test_every_download_cut_mid_file_is_resumed(hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Real weights span many read chunks; shrink the chunk so the tiny files do too.
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 4 * 1024)
    files = [(repo, name) for repo in (MODEL_REPO, ADAPTER_REPO) for name in hub.repos[repo].files]
    big = [(repo, name) for repo, name in files if len(hub.repos[repo].files[name]) > 8 * 1024]
    hub.cut_once.update(big)
    root = tmp_path / "root"
    result = install(root)
    assert result.exit_code == 0, result.output
    resumed = [key for key in big if [r is not None for r in hub.downloads_of(*key)] == [False, True]]
    layout = RootLayout.of(root)
    for repo, name in files:
        folder = layout.model_dir(repo) if repo == MODEL_REPO else layout.adapter_dir(repo)
        assert (folder / name).read_bytes() == hub.repos[repo].files[name]
    assert verify_receipt(root) == []
    figures = {"files": len(files), "cut_mid_file": len(big), "resumed_with_range": len(resumed)}
    record_figures("download_resume", figures)
    assert big and resumed == big


def test_a_mirror_serving_a_corrupted_file_is_refused(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = hub.repos[MODEL_REPO]
    listed, hub_listing = repo.sibling("model.safetensors"), repo.sibling
    good = repo.files["model.safetensors"]
    # The Hub lists the right size and sha256, the mirror serves other bytes of the same size.
    repo.files["model.safetensors"] = bytes([good[0] ^ 0xFF]) + good[1:]
    monkeypatch.setattr(repo, "sibling", lambda name: listed if name == "model.safetensors" else hub_listing(name))
    root = tmp_path / "root"
    result = install(root)
    assert result.exit_code == 1
    line = error_line(result)
    assert "model.safetensors" in line and "sha256" in line and "twice" in line
    assert not (RootLayout.of(root).model_dir(MODEL_REPO) / "model.safetensors").exists()
    assert read_receipt(root) is None
    fetches = len(hub.downloads_of(MODEL_REPO, "model.safetensors"))
    # The mirror is fixed: the same command completes.
    repo.files["model.safetensors"] = good
    assert install(root).exit_code == 0 and verify_receipt(root) == []
    record_figures("download_corrupted", {"fetches_before_refusal": fetches, "receipt_after_refusal": False})


def test_a_full_disk_is_one_clear_line_leaves_no_receipt_and_a_rerun_works(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_get = huggingface_hub.file_download.http_get

    def disk_full(url: str, temp_file: Any, **kwargs: Any) -> None:
        if url.endswith("model.safetensors"):
            temp_file.write(b"\0" * 1024)
            raise OSError(errno.ENOSPC, "No space left on device")
        real_get(url, temp_file, **kwargs)

    monkeypatch.setattr(huggingface_hub.file_download, "http_get", disk_full)
    root = tmp_path / "root"
    result = install(root)
    assert result.exit_code == 1
    line = error_line(result)
    assert "disk is full" in line and "free some space" in line and "model.safetensors" in line
    assert read_receipt(root) is None
    model_dir = RootLayout.of(root).model_dir(MODEL_REPO)
    assert not (model_dir / "model.safetensors").exists()
    assert not [p for p in root.rglob("*") if p.is_file() and p.name.endswith(".incomplete")]
    monkeypatch.setattr(huggingface_hub.file_download, "http_get", real_get)
    rerun = install(root)
    record_figures("disk_full", {"error_lines": 1, "receipt_written": False, "rerun_exit_code": rerun.exit_code})
    assert rerun.exit_code == 0
    assert verify_receipt(root) == []


# --------------------------------------------------------------------------- provider-config --apply

# Keys OpenClaw uses, so that generated configs often collide with the parts --apply writes.
_KEYS = st.sampled_from(["models", "providers", "agents", "defaults", "model", "primary", "mode", PROVIDER_ID, "x"])
_TEXT = st.text(max_size=12)
_SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _TEXT
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_KEYS | _TEXT, inner, max_size=4),
    max_leaves=20,
)
_CONFIGS = st.dictionaries(_KEYS | _TEXT, _VALUES, max_size=6)
# What --apply writes: the provider entry, the default model's primary (which may replace a string
# default by an object), and the alias of its own model entry.
_OWNED_PREFIXES = (
    ("models", "providers", PROVIDER_ID),
    ("agents", "defaults", "model"),
    ("agents", "defaults", "models", f"{PROVIDER_ID}/m1", "alias"),
)


def _leaves(value: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    if isinstance(value, dict) and value:
        for key, child in value.items():
            yield from _leaves(child, (*path, key))
    else:
        yield path, value


def _lookup(config: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(config, dict) or key not in config:
            return KeyError
        config = config[key]
    return config


def _same(a: Any, b: Any) -> bool:
    if b == {}:
        return isinstance(a, dict)  # an empty object may have received the provider block
    if isinstance(a, float) and isinstance(b, float):
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    return type(a) is type(b) and a == b


def _render(config: dict[str, Any], style: int) -> bytes:
    if style == 0:
        return json.dumps(config).encode("utf-8")
    if style == 1:
        return ("// my settings\n" + json5.dumps(config, indent=1, trailing_commas=True)).encode("utf-8")
    return json.dumps(config, indent=4, ensure_ascii=True).encode("ascii")


_property_runs: dict[str, int] = {"configs": 0, "applied": 0, "refused": 0, "keys_kept": 0}
CONFIG_EXAMPLES = 150
# Most generated configs have no section of the wrong type: if fewer than half were applied, the
# property was hardly tested. The exact split differs between machines (hypothesis's version).
MIN_APPLIED = CONFIG_EXAMPLES // 2


@settings(
    max_examples=CONFIG_EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
@given(config=_CONFIGS, style=st.integers(0, 2), set_default=st.booleans())
def test_apply_keeps_every_key_and_the_backup_restores_the_original(
    tmp_path_factory: pytest.TempPathFactory, config: dict[str, Any], style: int, set_default: bool
) -> None:
    folder = tmp_path_factory.mktemp("openclaw")
    path = folder / "openclaw.json"
    original = _render(config, style)
    path.write_bytes(original)
    args = ["provider-config", "--apply", "--config", str(path), "--model-id", "m1"]
    result = runner.invoke(app, args if set_default else [*args, "--no-set-default"])
    _property_runs["configs"] += 1
    if result.exit_code != 0:
        # Refused (a section of the wrong type): one line, and nothing on disk changed.
        _property_runs["refused"] += 1
        assert "OpenClaw config:" in error_line(result) and "nothing was changed" in result.output
        assert path.read_bytes() == original and [p.name for p in folder.iterdir()] == ["openclaw.json"]
        return
    _property_runs["applied"] += 1
    written = json.loads(path.read_bytes())  # the new file is plain JSON
    assert written["models"]["providers"][PROVIDER_ID]["api"] == "openai-completions"
    for leaf_path, value in _leaves(config):
        owned = any(leaf_path[: len(prefix)] == prefix for prefix in _OWNED_PREFIXES)
        if not owned or (not set_default and leaf_path[:3] == ("agents", "defaults", "model")):
            assert _same(_lookup(written, leaf_path), value), leaf_path
            _property_runs["keys_kept"] += 1
    # The backup holds the original bytes; the file itself was replaced.
    (backup,) = [p for p in folder.iterdir() if p.name.startswith("openclaw.json.bak-")]
    assert backup.read_bytes() == original != path.read_bytes()


def test_apply_property_figures() -> None:
    # Runs after the property test in this module (pytest keeps file order).
    record_figures("openclaw_config", dict(_property_runs))
    assert _property_runs["configs"] == CONFIG_EXAMPLES == _property_runs["applied"] + _property_runs["refused"]
    assert _property_runs["applied"] >= MIN_APPLIED and _property_runs["refused"] > 0
    assert _property_runs["keys_kept"] > _property_runs["applied"]  # most configs hold keys of their own


@pytest.mark.parametrize(
    "content",
    [
        b"{ models: ", b'{"a": 1} trailing', b"\xff\xfe{}", b"[]", b'{"models": [1]}', b'{"agents": {"defaults": 3}}',
        b'{"a":' * 5000 + b"1" + b"}" * 5000,
    ],
)
def test_a_config_that_cannot_be_used_is_left_alone(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "openclaw.json"
    path.write_bytes(content)
    result = runner.invoke(app, ["provider-config", "--apply", "--config", str(path)])
    assert result.exit_code == 1 and "nothing was changed" in error_line(result)
    assert path.read_bytes() == content and [p.name for p in tmp_path.iterdir()] == ["openclaw.json"]


@pytest.mark.parametrize(
    ("original", "expected"),
    [
        (b'{"note": "\\ud800 half a pair", "gateway": {"port": 1}}', "\ud800 half a pair"),
        (b'{"note": "\\ud83d\\ude00", "gateway": {"port": 1}}', "\U0001f600"),
        (b'// json5\n{note: "\\ud83d\\ude00", gateway: {port: 1,},}', "\U0001f600"),
    ],
)
def test_escaped_surrogates_survive_apply(tmp_path: Path, original: bytes, expected: str) -> None:
    path = tmp_path / "openclaw.json"
    path.write_bytes(original)
    result = runner.invoke(app, ["provider-config", "--apply", "--config", str(path)])
    assert result.exit_code == 0, result.output
    written = json.loads(path.read_bytes())
    assert written["note"] == expected and written["gateway"] == {"port": 1}
