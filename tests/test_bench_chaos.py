"""`bench.chaos` runs end to end for half a minute: faults hit a keeper-supervised sidecar, clients retry, a
fault-free replay agrees turn by turn, and a clean stop leaves no stray file (the long run is in bench/)."""

from __future__ import annotations

import json

import pytest

from bench import chaos


@pytest.mark.e2e
def test_a_short_chaos_soak_loses_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    # Faults come 2–5 s after the sidecar is healthy again; with seed 0 the first one is a stray SIGTERM.
    chaos.main(["--json", "--minutes", "0.5", "--sessions", "4", "--fault-gap", "2", "5", "--seed", "0"])
    report = json.loads(capsys.readouterr().out)
    assert set(report["faults"]) == set(chaos.FAULT_KINDS) and report["faults"]["sigterm"] >= 1
    assert report["turns"] > 0 and report["conversations"] >= 4
    assert set(report["targets"]) == {
        "no_differing_turns", "no_5xx", "no_leftover_files", "no_abandoned_turns", "rss_flat_after_warmup",
    }  # fmt: skip
    assert report["rss"]["samples"] and min(report["rss"]["peak_per_process_mb"]) > 0
    # Every fault was waited out: no client gave a turn up, and the sidecar answered no request with a 5xx.
    assert report["fault_errors"] == [] and report["abandoned_turns"] == 0, report["client_errors"]
    assert report["http_5xx"] == 0, report["client_errors"]
    assert report["leftover_files"] == []
    # The keeper started the sidecar again after the SIGTERM, and the sessions went on.
    assert report["turns_after_a_restart"] > 0
    # Answers and δ-states after kills, restarts and a full or read-only state dir equal a fault-free replay's.
    assert report["differing_turns"] == 0, report["differing"]
