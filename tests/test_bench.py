"""The benchmarks run end to end on tiny inputs (their figures are not asserted here: bench/ measures)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench import batch_layout, concurrency, kv_prefill, memory, plugin_load, restart, runtime, sessions


def test_runtime_bench_reports_every_figure() -> None:
    shape = runtime.Shape("tiny", 64, 2, 4, 2, 16, 128, 256)
    result = runtime._run(shape, prompt_tokens=64, decode_tokens=4, prefill_pairs=1, decode_pairs=1, seed=0)
    for phase in ("prefill", "decode"):
        for key in (f"{phase}_tps_plain", f"{phase}_tps_delta", f"{phase}_ratio"):
            assert result[key] > 0, key
    assert result["prompt_tokens"] == 64 and result["model"]["hidden_size"] == 64


@pytest.mark.e2e
def test_sessions_bench_replays_openclaw_turns(
    tiny_model_dir: Path, tiny_adapter_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--json", "--turns", "3", "--system-tokens", "300", "--max-tokens", "2"]
    assert sessions.main([*argv, "--model", str(tiny_model_dir), "--adapter", str(tiny_adapter_dir)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [t["turn"] for t in report["turns"]] == [1, 2, 3]
    for turn in report["turns"][1:]:
        # From turn 2 on only what is new is prefilled: the dropped context message is rolled back.
        assert turn["cached_tokens"] > 0 and turn["prefilled_tokens"] <= turn["new_tokens"] + 512
    assert all(t["cached_tokens"] == 0 for t in report["no_cache_turns"])
    assert report["prefix_cache"]["hits"] >= 2 and report["non_shared_tokens"] > 0


def test_kv_prefill_bench_times_the_three_paths_per_phase(capsys: pytest.CaptureFixture[str]) -> None:
    assert kv_prefill.main(["--json", "--contexts", "128", "--chunk", "16", "--repeats", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    for phase in ("prefill_128", "decode_128"):
        assert all(report[phase][key] > 0 for key in ("float_s", "old_s", "new_s", "old_vs_float", "new_vs_float"))
    assert report["bits"] == 8 and len(report["load_before"]) == 3


def test_batch_layout_bench_measures_both_layouts() -> None:
    shape = runtime.Shape("tiny", 64, 2, 4, 2, 16, 128, 256)
    result = batch_layout.measure(shape, [16, 40, 100], repeats=1, seed=0)
    for key in ("step_ms_rows", "step_ms_padded", "step_ms_rows_delta", "attention_layer_ms_rows",
                "attention_layer_ms_padded", "merge_all_ms", "leave_extract_ms", "leave_filter_ms", "join_extend_ms"):
        assert result[key] > 0, key
    # Padding to the longest row: the padded buffer holds more than the rows themselves.
    assert result["kv_mib_padded"] > result["kv_mib_rows"]


@pytest.mark.e2e
def test_concurrency_bench_runs_the_three_servers(
    tiny_model_dir: Path, tiny_adapter_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--json", "--quick", "--sessions", "1,2", "--system-tokens", "200", "--long-tokens", "300",
            "--max-tokens", "8", "--prefill-chunk", "64", "--decode-rounds", "1", "--model", str(tiny_model_dir),
            "--adapter", str(tiny_adapter_dir)]  # fmt: skip
    assert concurrency.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["gap_sessions"] == [2]  # --quick: a gap round at the largest N only
    for name in ("max_batch_8", "max_batch_1", "mlx_lm_server"):
        rounds = report["servers"][name]["rounds"]
        assert [r["n"] for r in rounds] == [1, 2]
        for row in rounds:
            assert row["tok_s"] > 0 and row["throughput_tok_s"] > 0 and row["ttft_max_s"] >= row["ttft_p50_s"] > 0
        assert "long_prompt_ttft_s" not in rounds[0]
        assert rounds[1]["long_prompt_ttft_s"] > 0 and rounds[1]["max_stream_gap_s"] > 0
    gap_round = report["servers"]["max_batch_8"]["rounds"][1]
    assert gap_round["decode_interval_longest_s"] > 0 and gap_round["prefill_step_longest_s"] > 0
    assert gap_round["decode_interval_over_longest_prefill_step"] > 0
    assert report["servers"]["mlx_lm_server"]["prefill_step_tokens"] == 2048
    for key in ("throughput_vs_peer_n8", "throughput_vs_unbatched_n8", "ttft_max_vs_peer_n8", "n1_vs_unbatched"):
        assert report[key] > 0


def test_plugin_load_bench_counts_what_openclaw_copies(tmp_path: Path) -> None:
    root = tmp_path / "clone"
    outside = tmp_path / "clone.venv"
    for folder in (root / "plugin_tools", root / ".git", root / ".cache" / "x" / "node_modules", outside):
        folder.mkdir(parents=True)
    (root / "plugin_tools" / "index.js").write_bytes(b"x" * 1_000_000)
    (root / ".cache" / "x" / "package.json").write_bytes(b"x" * 200_000)
    for skipped in (root / ".git" / "HEAD", root / ".cache" / "x" / "node_modules" / "big", outside / "big"):
        skipped.write_bytes(b"x" * 10_000_000)
    (root / ".venv").symlink_to(outside)  # leaves the root: left out
    (root / "tools").symlink_to(root / "plugin_tools")  # stays inside: followed, copied again
    copied = plugin_load.copied_by_openclaw(root)
    assert copied == {"files": 3, "mb": 2.2}


@pytest.mark.e2e
def test_memory_bench_reports_every_kv_setting(
    tiny_kv_model_dir: Path, tiny_kv_adapter_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "--json", "--sessions", "2", "--turns", "2", "--max-tokens", "3", "--system-chars", "1500", "--tools", "0",
        "--agreement-sessions", "1", "--agreement-tokens", "4", "--copies-bits", "none",
        "--model", str(tiny_kv_model_dir), "--adapter", str(tiny_kv_adapter_dir),
    ]  # fmt: skip
    assert memory.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    held = report["sessions_per_budget"]
    sharing = report["sharing"]
    layouts = (["sharing", "copies"] if sharing["flag"] else ["sharing"]) if sharing["default"] else ["copies"]
    # --copies-bits none: float runs both ways, 8 and 4 bits only as serve runs by default.
    assert sorted(held["none"]["measured"]) == sorted(layouts) and list(held["8"]["measured"]) == layouts[:1]
    for layout in layouts:
        # The resident bytes are what the arithmetic says for these sessions (allocation steps aside).
        assert 0.9 <= held["none"]["measured"][layout]["kv_over_predicted"] <= 1.1, held["none"]["measured"]
    for name in ("none", "8", "4"):
        setting = report["settings"][name]
        for key in ("kv_bytes", "bytes_per_session", "delta_record_bytes", "rss_peak_bytes", "prefill_tok_s"):
            assert setting[key] > 0, (name, key)
        assert [r["turn"] for r in setting["requests"]] == [1, 1, 2, 2]
    for name in ("8", "4"):
        for key in ("token_agreement", "teacher_forced_agreement"):
            assert 0 <= report["settings"][name][key] <= 1
        assert report["settings"][name]["max_logit_diff_first_step"] > 0
    # float32 K/V here: 8 bits hold (1 + 8/64)/4 of the float bytes, 4 bits (0.5 + 8/64)/4.
    assert report["ratios"]["8"]["kv_bytes"] == pytest.approx(0.28125, abs=0.01)
    assert report["ratios"]["4"]["kv_bytes"] == pytest.approx(0.15625, abs=0.01)
    assert set(report["targets"]) >= {"kv8_bytes_at_most_0_55", "delta_record_at_most_1_percent"}
    record = report["settings"]["none"]["sparse_record"]
    assert record["record_bytes"] < record["every_token_record_bytes"] and record["trim_refill_tokens"] == 63


def test_memory_bench_arithmetic_for_the_16gb_profile() -> None:
    # The figures: a 16 GB Mac's 6 GiB holds 4 OpenClaw-sized 8-bit sessions as copies; sharing
    # the prompt holds 16 (17 without the δ records, 2.9 MB a session).
    shape, budget = _qwen3_delta_shape_and_budget()
    plan = memory.profile_sessions(shape, 8, budget)
    assert (plan["copies"]["sessions"], plan["sharing"]["sessions"]) == (4, 16)


def _qwen3_delta_shape_and_budget() -> tuple[Any, int]:
    from common.kv_budget import kv_budget
    from presets.catalog import load_preset

    preset = load_preset("qwen3-delta")
    assert preset.kv_shape is not None and preset.weights_bytes is not None
    return preset.kv_shape, kv_budget(memory.PROFILE_RAM_BYTES, preset.weights_bytes).kv_bytes


@pytest.mark.e2e
def test_restart_bench_times_warm_restart_and_replay(
    tiny_kv_model_dir: Path, tiny_kv_adapter_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "--json", "--max-tokens", "3", "--system-chars", "1500", "--tools", "0",
        "--model", str(tiny_kv_model_dir), "--adapter", str(tiny_kv_adapter_dir),
    ]  # fmt: skip
    assert restart.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    runs = report["runs"]
    assert [t["turn"] for t in runs["restart"]["turns"]] == [1, 1, 2, 2]
    assert runs["restart"]["disk_after_restart"]["hits"] == 2  # both sessions came back from disk
    replayed = [t["prefilled_tokens"] for t in runs["replay"]["timed"]]
    restored = [t["prefilled_tokens"] for t in runs["restart"]["timed"]]
    assert all(r < p / 2 for r, p in zip(restored, replayed)), (restored, replayed)
    assert report["disk_bytes"] > 0 and all(0.9 < r < 1.2 for r in report["written_vs_turn_kv"])
    assert set(report["targets"]) == {
        "restart_at_most_1_5x_warm", "restart_at_least_5x_faster_than_replay", "bytes_written_at_most_1_2x_turn_kv"
    }
