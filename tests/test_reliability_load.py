"""Load: 8 concurrent sessions × 25 streaming turns, batched, clients leaving mid-stream, LRU limits reached.

The load runs against one server, then every session's completed turns are replayed alone, one
session at a time, against a fresh second server. No cross-talk means every session ends with
exactly the history and δ-state of its solo replay. The driver is bench/soak.py (which runs the
same thing at a larger scale).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from reliability import health, record_figures, saved_session, unexpected_files
from server_process import KEY, MODEL, Server, start_server, stop_server

from bench.soak import (
    STATE_TOLERANCE,
    LoadReport,
    SoakPlan,
    largest_stat_difference,
    replay_solo,
    rss_growth_after_limits,
    run_load,
    state_stats,
)
from installer.sidecar_client import SidecarClient
from sidecar.sessions.keys import hash_session_key

pytestmark = pytest.mark.e2e

PLAN = SoakPlan(sessions=8, turns=25)
# Small enough that the LRU bound by KV bytes is reached part-way through the run (the tiny model's
# sessions hold about half what they did before the δ record went sparse).
MAX_KV_BYTES = 6 * 1024 * 1024
# What the server may grow by once the LRU limits hold: allocator caches and longer prompts, not sessions.
RSS_GROWTH_LIMIT_MB = 96


@pytest.fixture(scope="module")
def servers(
    tiny_model_dir: Path, tiny_adapter_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Server, Server]]:
    loaded = start_server(
        tiny_model_dir, tiny_adapter_dir, tmp_path_factory.mktemp("load"), "--max-kv-bytes", str(MAX_KV_BYTES)
    )
    solo = start_server(tiny_model_dir, tiny_adapter_dir, tmp_path_factory.mktemp("solo"))
    yield loaded, solo
    for server in (loaded, solo):
        if server.process.poll() is None:
            stop_server(server)


@pytest.fixture(scope="module")
def run(servers: tuple[Server, Server]) -> tuple[LoadReport, dict[str, list[str]]]:
    loaded, solo = servers
    report = run_load(SidecarClient(loaded.base_url, KEY, MODEL), PLAN, "load", loaded.process.pid)
    solo_client = SidecarClient(solo.base_url, KEY, MODEL)
    solo_answers = replay_solo(solo_client, report.requests, _solo_keys(report), PLAN.max_tokens)
    return report, solo_answers


def _solo_keys(report: LoadReport) -> dict[str, str]:
    return {key: f"solo-{key}" for key in report.requests}


def test_every_turn_completes_and_leaving_clients_are_cancelled_cleanly(
    servers: tuple[Server, Server], run: tuple[LoadReport, dict[str, list[str]]]
) -> None:
    loaded, _ = servers
    report, _ = run
    after = health(loaded)
    rss = rss_growth_after_limits(report.rss_samples)
    record_figures(
        "load",
        {
            "sessions": PLAN.sessions,
            "turns_per_session": PLAN.turns,
            "turns_completed": report.turns_completed,
            "disconnects": report.disconnects,
            "cancelled_by_server": report.cancelled_by_server,
            "errors": len(report.errors),
            "jobs_failed": after["jobs"]["failed"],
            "evictions": after["sessions"]["evictions"],
            "decode_steps": after["batch"]["steps"],
            "mean_batch_occupancy": after["batch"]["mean_occupancy"],
            "replays_checked_against_saved_state": after["sessions"]["replay_checks"],
            "replay_mismatches": after["sessions"]["replay_mismatches"],
            **rss,
            "elapsed_s": report.elapsed_s,
        },
    )
    assert report.errors == []
    assert report.turns_completed == PLAN.sessions * PLAN.turns
    assert report.disconnects == PLAN.sessions * (PLAN.turns // PLAN.leave_every)
    # A client that leaves before the answer ends gets its job cancelled; none of them broke anything.
    assert 0 < report.cancelled_by_server <= report.disconnects
    assert after["jobs"]["failed"] == 0 and loaded.process.poll() is None
    # The sessions were answered together (the server runs with its default --max-batch 8).
    assert after["batch"]["max_batch"] == 8 and after["batch"]["mean_occupancy"] > 1
    assert "Traceback" not in loaded.log_text()
    # Evicted sessions came back by replaying their history, each checked against its saved δ-state.
    assert after["sessions"]["evictions"] > 0 and after["sessions"]["replay_checks"] > 0
    assert after["sessions"]["replay_mismatches"] == 0
    # The LRU limits held, and memory stayed bounded once they were reached.
    assert rss["limits_reached"] and after["sessions"]["kv_bytes"] <= MAX_KV_BYTES
    assert after["sessions"]["in_memory"] <= after["sessions"]["max_sessions"]
    assert rss["growth_after_limits_mb"] <= RSS_GROWTH_LIMIT_MB


def test_every_session_equals_its_solo_replay(
    servers: tuple[Server, Server], run: tuple[LoadReport, dict[str, list[str]]]
) -> None:
    loaded, solo = servers
    report, solo_answers = run
    solo_keys = _solo_keys(report)
    load_dir, solo_dir = (Path(server.log).parent / "state" for server in servers)
    equal_files = equal_stats = equal_answers = 0
    largest = 0.0
    finals = []
    for key in report.requests:
        tokens, states = saved_session(load_dir / f"{hash_session_key(key)}.delta.session.npz")
        solo_tokens, solo_states = saved_session(solo_dir / f"{hash_session_key(solo_keys[key])}.delta.session.npz")
        same_history = tokens == solo_tokens and len(states) == len(solo_states) > 0
        difference = max(float(np.max(np.abs(a - b))) for a, b in zip(states, solo_states))
        largest = max(largest, difference)
        equal_files += same_history and difference <= STATE_TOLERANCE
        stats = state_stats(SidecarClient(loaded.base_url, KEY, MODEL), key)
        solo_stats = state_stats(SidecarClient(solo.base_url, KEY, MODEL), solo_keys[key])
        equal_stats += largest_stat_difference(stats, solo_stats) <= STATE_TOLERANCE
        equal_answers += report.answers[key] == solo_answers[key]
        finals.append(states)
    # The comparison can tell sessions apart: different conversations end in different states.
    apart = min(
        max(float(np.max(np.abs(a - b))) for a, b in zip(finals[i], finals[j]))
        for i in range(len(finals))
        for j in range(i + 1, len(finals))
    )
    record_figures(
        "isolation",
        {
            "sessions": len(report.requests),
            "equal_to_solo_replay_files": equal_files,
            "equal_to_solo_replay_stats": equal_stats,
            "answers_equal_to_solo_replay": equal_answers,
            "largest_state_difference": largest,
            "smallest_difference_between_sessions": apart,
            "tolerance": STATE_TOLERANCE,
        },
    )
    assert equal_files == equal_stats == PLAN.sessions
    assert equal_answers == PLAN.sessions
    assert apart > 100 * STATE_TOLERANCE
    assert unexpected_files(load_dir) == [] and unexpected_files(solo_dir) == []
