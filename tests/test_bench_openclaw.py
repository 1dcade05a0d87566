"""bench.concurrency --openclaw runs end to end on the tiniest shapes (bench/ measures; nothing is timed here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import concurrency
from bench.concurrency import Streamed
from bench.openclaw_rows import all_rows_rate


@pytest.mark.e2e
def test_openclaw_rows_report_every_server_per_n(
    tiny_kv_model_dir: Path, tiny_kv_adapter_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--openclaw", "--json", "--sessions", "1,2", "--system-chars", "1500", "--tools", "0",
            "--own-tokens", "40,80", "--max-tokens", "6", "--decode-rounds", "1", "--prefill-chunk", "64",
            "--model", str(tiny_kv_model_dir), "--adapter", str(tiny_kv_adapter_dir)]  # fmt: skip
    assert concurrency.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    sharing = report["sharing"]
    # serve as it is (sharing, or copies before sharing), and --no-share-prefix once serve has it.
    sidecars = (["share", "copies"] if sharing["flag"] else ["share"]) if sharing["default"] else ["copies"]
    assert sorted(report["servers"]) == sorted([*sidecars, "mlx_lm_server"])
    assert report["prefix_tokens"] > 0 and all(t > report["prefix_tokens"] for t in report["session_tokens"])
    for name, server in report["servers"].items():
        rounds = server["rounds"]
        assert [(r["n"], r["new_sessions"]) for r in rounds] == [(1, 1), (2, 1)], name
        for row in rounds:
            assert row["decode_tok_s"] > 0 and row["ttft_max_s"] >= row["ttft_p50_s"] > 0 and row["rss_bytes"] > 0
    for name in sidecars:
        last = report["servers"][name]["rounds"][-1]
        # Both sessions and the warm-up one are resident; no layout holds less than one prompt + their own tokens.
        assert last["resident_sessions"] == 3 and last["kv_over_ideal"] >= 0.99, last
    assert all(report[f"{name}_vs_peer_decode_max_n"] > 0 for name in sidecars)
    expected = set()
    if sharing["default"]:
        expected = {"share_vs_peer_decode_at_least_1_8", "share_kv_within_5_percent_of_ideal"}
    if len(sidecars) == 2:
        expected |= {"share_vs_copies_decode_at_least_1_5", "share_n1_decode_at_least_0_95"}
    assert set(report["targets"]) == expected


def test_decode_rate_counts_only_the_time_every_row_streams() -> None:
    # Row a streams 0..10 s (11 chunks, 22 tokens), row b 5..10 s (6 chunks, 6 tokens): both stream over 5..10 s,
    # when a's 5 chunks (10 tokens) and b's 5 after its first (5 tokens) arrive.
    a = Streamed(sent=0.0, arrivals=[float(t) for t in range(11)], completion_tokens=22)
    b = Streamed(sent=0.0, arrivals=[float(t) for t in range(5, 11)], completion_tokens=6)
    assert all_rows_rate([a, b]) == pytest.approx((10 + 5) / 5)
    c = Streamed(sent=0.0, arrivals=[11.0, 12.0], completion_tokens=2)
    assert all_rows_rate([a, c]) is None  # never both at once
