"""Presets: the shipped files load and match DESIGN §7; bad files and bad overrides fail with clear errors."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from installer.cli import app
from presets.catalog import (
    MIN_CONTEXT_WINDOW,
    PresetError,
    list_presets,
    load_preset,
    parse_preset,
    preset_names,
    with_overrides,
)

runner = CliRunner()
PRESETS_DIR = Path(__file__).resolve().parents[1] / "presets"


def _raw(name: str) -> dict[str, Any]:
    return yaml.safe_load((PRESETS_DIR / f"{name}.yaml").read_text(encoding="utf-8"))


def test_shipped_presets_match_the_design_table() -> None:
    assert preset_names() == ["custom", "qwen3-delta", "smoke"]
    qwen = load_preset("qwen3-delta")
    assert qwen.model.repo == "mlx-community/Qwen3-4B-Instruct-2507-4bit"
    assert qwen.model_id == "delta-mem-qwen3-4b-mlx"
    assert qwen.min_memory_gb == 16
    assert qwen.adapter is not None and qwen.adapter.repo == "declare-lab/delta-mem_qwen3_4b-instruct"
    assert qwen.adapter_alternatives == ("ofthetrees/delta-mem-qwen3-4b-instruct-mlx-adapter",)
    smoke = load_preset("smoke")
    assert smoke.model.repo == "mlx-community/Qwen2.5-0.5B-Instruct-4bit"
    assert smoke.model_id == "qwen2.5-0.5b-mlx-test"
    assert smoke.min_memory_gb == 8
    assert smoke.adapter is None  # the old plugin's smoke preset failed looking for the Qwen3 adapter
    custom = load_preset("custom")
    assert not custom.model.is_set and custom.model_id is None and custom.adapter is None


def test_every_preset_gives_openclaw_a_usable_context_window() -> None:
    for preset in list_presets():
        assert preset.context_window >= MIN_CONTEXT_WINDOW
        assert preset.max_output_tokens < preset.context_window
        assert "*.py" not in preset.model_files  # never fetch code from a model repo


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(context_window=8192), "OpenClaw refuses models under 16000"),
        (lambda d: d.update(min_memory_gb=0), "min_memory_gb must be a positive number"),
        (lambda d: d.update(min_memory_gb=True), "min_memory_gb must be a positive number"),
        (lambda d: d.update(colour="blue"), "unknown key\\(s\\) colour"),
        (lambda d: d.pop("model_id"), "missing key\\(s\\) model_id"),
        (
            lambda d: d["model"].update(repo="not a repo"),
            "model.repo: 'not a repo' is not a Hugging Face repo id",
        ),
        (lambda d: d["model"].update(repo="../etc/passwd"), "is not a Hugging Face repo id"),
        (lambda d: d["model"].update(path="/x"), "give a repo or a path, not both"),
        (lambda d: d["model"].update(files=[]), "model.files must be a non-empty list"),
        (lambda d: d["adapter"].update(repo=None), "adapter needs a repo or a path"),
        (lambda d: d["adapter"].update(alternatives=["x"]), "adapter.alternatives: 'x' is not"),
        (lambda d: d.update(model_id="has space"), "model_id: 'has space' is not a usable model id"),
        (
            lambda d: d.update(max_output_tokens=40000),
            "max_output_tokens must be smaller than context_window",
        ),
    ],
)
def test_bad_preset_files_fail_with_the_key_named(change: Any, message: str) -> None:
    data = copy.deepcopy(_raw("qwen3-delta"))
    change(data)
    with pytest.raises(PresetError, match=message) as info:
        parse_preset(data, origin="presets/broken.yaml")
    assert str(info.value).startswith("presets/broken.yaml")


def test_a_preset_that_is_not_a_mapping_is_refused() -> None:
    with pytest.raises(PresetError, match="must be a mapping"):
        parse_preset(["a", "list"], origin="x.yaml")


def test_unknown_preset_lists_the_known_ones() -> None:
    with pytest.raises(PresetError, match="unknown preset 'nope': choose one of custom, qwen3-delta, smoke"):
        load_preset("nope")


def test_custom_needs_a_model_and_an_id() -> None:
    custom = load_preset("custom")
    with pytest.raises(PresetError, match="--model-repo ID or --model-path DIR"):
        with_overrides(custom, model_id="mine")
    with pytest.raises(PresetError, match="--model-id"):
        with_overrides(custom, model_repo="me/model")
    done = with_overrides(custom, model_repo="me/model", model_id="mine", min_memory_gb=4)
    assert done.model.repo == "me/model" and done.model_id == "mine" and done.min_memory_gb == 4


def test_custom_takes_local_folders(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "adapter").mkdir()
    preset = with_overrides(
        load_preset("custom"), model_path=tmp_path / "model", adapter_path=tmp_path / "adapter", model_id="m"
    )
    assert preset.model.path == (tmp_path / "model").resolve()
    assert preset.adapter is not None and preset.adapter.path == (tmp_path / "adapter").resolve()
    with pytest.raises(PresetError, match="is not a directory"):
        with_overrides(load_preset("custom"), model_path=tmp_path / "missing", model_id="m")


def test_qwen3_delta_can_switch_to_the_mlx_adapter_copy() -> None:
    preset = with_overrides(
        load_preset("qwen3-delta"), adapter_repo="ofthetrees/delta-mem-qwen3-4b-instruct-mlx-adapter"
    )
    assert (
        preset.adapter is not None
        and preset.adapter.repo == "ofthetrees/delta-mem-qwen3-4b-instruct-mlx-adapter"
    )
    assert preset.model.repo == "mlx-community/Qwen3-4B-Instruct-2507-4bit"


def test_conflicting_overrides_are_refused(tmp_path: Path) -> None:
    with pytest.raises(PresetError, match="not both"):
        with_overrides(load_preset("smoke"), model_repo="a/b", model_path=tmp_path)
    with pytest.raises(PresetError, match="not both"):
        with_overrides(load_preset("smoke"), adapter_repo="a/b", adapter_path=tmp_path)


def test_presets_command_lists_every_preset() -> None:
    result = runner.invoke(app, ["presets"])
    assert result.exit_code == 0
    for name in ("qwen3-delta:", "smoke:", "custom:", "ofthetrees/delta-mem-qwen3-4b-instruct-mlx-adapter"):
        assert name in result.output
    as_json = runner.invoke(app, ["presets", "--json"])
    assert as_json.exit_code == 0
    listed = {p["name"]: p for p in yaml.safe_load(as_json.output)["presets"]}
    assert listed["smoke"]["adapter"] is None
    assert listed["qwen3-delta"]["min_memory_gb"] == 16


def test_presets_help_has_examples() -> None:
    result = runner.invoke(app, ["presets", "--help"])
    assert result.exit_code == 0 and "delta-mem-mlx presets --json" in result.output
