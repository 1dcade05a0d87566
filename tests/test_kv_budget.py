"""The KV arithmetic without MLX: bytes per token and session, the machine's budget, the announced window."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.kv_budget import (
    BUDGET_QUANTUM,
    GIB,
    OPENCLAW_OWN_TOKENS,
    OPENCLAW_PREFIX_TOKENS,
    KvShape,
    cache_tokens,
    context_window_for,
    delta_record_bytes,
    gpu_limit,
    kv_budget,
    kv_bytes_per_token,
    openclaw_session_bytes,
    parse_kv_bits,
    session_bytes,
    sessions_report,
)
from common.settings import SettingsError, SidecarSettings
from presets.catalog import load_preset
from presets.memory_plan import announced_window, plan_memory

QWEN3_4B = KvShape(layers=36, kv_heads=8, head_dim=128, dtype_bytes=2, delta_layers=36, delta_state_floats=64)
WEIGHTS = 2_260_000_000  # mlx-community/Qwen3-4B-Instruct-2507-4bit


def test_a_qwen3_4b_token_costs_what_the_issue_says() -> None:
    assert kv_bytes_per_token(QWEN3_4B) == 144 * 1024
    assert kv_bytes_per_token(QWEN3_4B, 8) / kv_bytes_per_token(QWEN3_4B) == 0.53125  # target ≤ 0.55
    assert kv_bytes_per_token(QWEN3_4B, 4) / kv_bytes_per_token(QWEN3_4B) == 0.28125  # target ≤ 0.30
    # A state after every token would be 9 KiB per token (6.25 % of the KV); the sparse record is ≤ 1 %.
    tokens = OPENCLAW_PREFIX_TOKENS + OPENCLAW_OWN_TOKENS
    assert delta_record_bytes(QWEN3_4B, tokens, 64) < 0.01 * tokens * kv_bytes_per_token(QWEN3_4B)


def test_the_shape_comes_from_config_json_and_the_adapter_config() -> None:
    config = {
        "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
        "hidden_size": 2560, "torch_dtype": "bfloat16", "max_position_embeddings": 262144,
    }  # fmt: skip
    shape = KvShape.from_config(config, {"rank": 8, "num_state_heads": 1, "target_layers": []})
    assert shape == KvShape(36, 8, 128, 2, 36, 64, 262144)
    assert KvShape.from_config({**config, "torch_dtype": "float32"}).dtype_bytes == 4
    assert KvShape.from_config(config, {"rank": 8, "num_state_heads": 4, "target_layers": [0, 5]}).delta_layers == 2


def test_the_budget_on_a_16_gb_mac_is_6_gib_and_every_term_is_accounted_for() -> None:
    budget = kv_budget(16 * GIB, WEIGHTS)
    assert budget.kv_bytes == 6 * GIB
    assert budget.os_reserve == 16 * GIB // 3 and budget.openclaw_reserve == GIB
    spent = budget.kv_bytes + budget.os_reserve + budget.openclaw_reserve + budget.model_bytes + budget.runtime_reserve
    assert spent <= 16 * GIB
    assert budget.kv_bytes + budget.model_bytes + budget.runtime_reserve <= gpu_limit(16 * GIB)
    assert budget.kv_bytes < 8 * GIB  # the old default did not fit
    report = sessions_report(budget.kv_bytes, QWEN3_4B)
    # Issue 23's target: at least 16 OpenClaw-sized sessions at 8-bit with the system prompt held once.
    assert {name: row["sessions"] for name, row in report.items()} == {"none": 7, "8": 16, "4": 34}
    assert {name: row["sessions_without_sharing"] for name, row in report.items()} == {"none": 1, "8": 4, "4": 8}


def test_a_session_sharing_the_prefix_holds_its_own_tokens_and_its_whole_delta_record() -> None:
    tokens, shared = OPENCLAW_PREFIX_TOKENS + OPENCLAW_OWN_TOKENS, OPENCLAW_PREFIX_TOKENS
    own = session_bytes(QWEN3_4B, tokens, 8, messages=64, shared=shared)
    assert own == cache_tokens(OPENCLAW_OWN_TOKENS) * kv_bytes_per_token(QWEN3_4B, 8) + delta_record_bytes(
        QWEN3_4B, tokens, 64
    )
    assert own == openclaw_session_bytes(QWEN3_4B, 8, 64, share_prefix=True)
    private = openclaw_session_bytes(QWEN3_4B, 8, 64, share_prefix=False)
    assert private == session_bytes(QWEN3_4B, tokens, 8, messages=64)
    # (budget − one prefix) // own bytes per session, the formula docs/design.md gives.
    prefix = session_bytes(QWEN3_4B, shared, 8)
    assert sessions_report(6 * GIB, QWEN3_4B)["8"] == {
        "prefix_bytes": prefix,
        "bytes_per_session": own,
        "sessions": (6 * GIB - prefix) // own,
        "bytes_per_session_without_sharing": private,
        "sessions_without_sharing": (6 * GIB - prefix) // private,
    }


@given(ram=st.integers(1 * GIB, 512 * GIB), weights=st.integers(0, 64 * GIB))
def test_the_budget_never_exceeds_what_the_formula_allows(ram: int, weights: int) -> None:
    budget = kv_budget(ram, weights)
    assert budget.kv_bytes >= 0 and budget.kv_bytes % BUDGET_QUANTUM == 0
    if budget.kv_bytes:
        others = budget.os_reserve + budget.openclaw_reserve + budget.model_bytes + budget.runtime_reserve
        assert budget.kv_bytes + others <= ram
        assert budget.kv_bytes + budget.model_bytes + budget.runtime_reserve <= budget.gpu_limit
    assert kv_budget(ram + GIB, weights).kv_bytes >= budget.kv_bytes


def test_a_machine_too_small_gets_no_budget() -> None:
    assert kv_budget(8 * GIB, WEIGHTS).kv_bytes == 0


def test_sessions_hold_whole_cache_steps() -> None:
    plain = KvShape(layers=36, kv_heads=8, head_dim=128, dtype_bytes=2)
    assert session_bytes(plain, 1) == session_bytes(plain, 256) == 256 * 144 * 1024 < session_bytes(plain, 257)


def test_the_window_doubles_while_a_full_window_fits_between_floor_and_ceiling() -> None:
    six = 6 * GIB
    assert context_window_for(six, QWEN3_4B, None, 64, 32768, 262144) == 32768
    assert context_window_for(six, QWEN3_4B, 8, 64, 32768, 262144) == 65536
    assert context_window_for(six, QWEN3_4B, 4, 64, 32768, 262144) == 131072
    assert context_window_for(six, QWEN3_4B, 4, 64, 32768, 65536) == 65536  # the ceiling
    assert context_window_for(0, QWEN3_4B, 4, 64, 32768, 262144) == 32768  # never below the floor
    assert session_bytes(QWEN3_4B, 65536, 8) <= six < session_bytes(QWEN3_4B, 131072, 8)


@pytest.mark.parametrize(
    ("ram_gb", "budget_gib", "sessions", "copying"),
    [
        (16, 6.0, (7, 16, 34), (1, 4, 8)),
        (24, 11.25, (16, 34, 66), (4, 8, 16)),
        (32, 16.5, (26, 51, 99), (6, 13, 25)),
        (64, 38.0, (64, 123, 233), (16, 30, 59)),
    ],
)
def test_the_ram_table_rows(
    ram_gb: int, budget_gib: float, sessions: tuple[int, int, int], copying: tuple[int, int, int]
) -> None:
    """docs/design.md's RAM table for qwen3-delta: the budget and the OpenClaw-sized sessions per precision,
    with the system prompt shared and copied per session."""
    budget = kv_budget(ram_gb * GIB, WEIGHTS)
    assert budget.kv_bytes == budget_gib * GIB
    report = sessions_report(budget.kv_bytes, QWEN3_4B)
    assert tuple(report[name]["sessions"] for name in ("none", "8", "4")) == sessions
    assert tuple(report[name]["sessions_without_sharing"] for name in ("none", "8", "4")) == copying


@pytest.mark.parametrize(
    ("ram_gb", "bits", "window"), [(16, 8, 65536), (24, 8, 131072), (32, None, 65536), (64, None, 262144)]
)
def test_the_qwen3_preset_chooses_precision_and_window_by_ram(ram_gb: int, bits: int | None, window: int) -> None:
    preset = load_preset("qwen3-delta")
    ram = ram_gb * GIB - 200 * 1024**2  # Macs report a little under their nominal RAM
    assert preset.kv_bits_for(ram) == bits
    plan = plan_memory(preset, preset.kv_shape, preset.weights_bytes, bits, ram_bytes=ram)
    assert plan.context_window == window
    assert announced_window(preset, preset.kv_shape, plan.budget.kv_bytes, bits, 64) == window


@pytest.mark.parametrize(("text", "bits"), [("none", None), ("NONE", None), ("8", 8), ("4", 4), (8, 8), (None, None)])
def test_kv_bits_are_parsed(text: object, bits: int | None) -> None:
    assert parse_kv_bits(text) == bits


@pytest.mark.parametrize("text", ["3", "16", "eight", "8.0"])
def test_other_kv_bits_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="none, 8 or 4"):
        parse_kv_bits(text)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"kv_bits": 3}, "kv_bits must be null"),
        ({"kv_group_size": 48}, "kv_group_size must be one of 32, 64, 128"),
    ],
)
def test_settings_refuse_kv_values_mlx_lm_cannot_use(change: dict[str, int], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        SidecarSettings(model_path="/m", model_id="m", **change).validate()


def test_settings_files_carry_kv_bits_and_refuse_a_string() -> None:
    settings = SidecarSettings.from_dict({"model_path": "/m", "model_id": "m", "kv_bits": 8, "kv_group_size": 32})
    assert (settings.kv_bits, settings.kv_group_size) == (8, 32)
    assert SidecarSettings.from_dict(settings.to_dict()) == settings
    with pytest.raises(SettingsError, match="kv_bits has the wrong type"):
        SidecarSettings.from_dict({"model_path": "/m", "model_id": "m", "kv_bits": "8"})
