"""The disk cache: sessions and the shared prefix come back from disk after a restart or an eviction,
and every file that fails a check falls back to a replay that gives the same answer."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest
from engine_support import job, openclaw_turns, run, session_of, settings_for

from sidecar.delta.api import delta_states
from sidecar.delta.shared_prefix import shared_prefix_of
from sidecar.engine.engine import Engine, load_engine
from sidecar.engine.interface import Finished, PromptDone, TextDelta
from sidecar.kvcache import disk_files
from sidecar.sessions.keys import hash_session_key

TURNS = openclaw_turns(3)


def answer(events: list[Any]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


def prompt_done(events: list[Any]) -> PromptDone:
    return next(e for e in events if isinstance(e, PromptDone))


def start(model: Path, adapter: Path | None, state: Path, **overrides: Any) -> Engine:
    overrides.setdefault("max_disk_bytes", 1024**3)
    return load_engine(settings_for(model, adapter, state, **overrides))


def stop(engine: Engine) -> None:
    asyncio.run(engine.close())


def two_turns_then_restart(model: Path, adapter: Path, state: Path, **overrides: Any) -> Engine:
    """Run the first two OpenClaw-shaped turns of two sessions, stop, and start a new engine on the same state."""
    first = start(model, adapter, state, **overrides)
    for messages in TURNS[:2]:
        for key in ("s1", "s2"):
            run(first, job(messages, key=key))
    stop(first)
    return start(model, adapter, state, **overrides)


def replayed(model: Path, adapter: Path, state: Path, **overrides: Any) -> tuple[str, list[mx.array]]:
    """The third turn's answer and δ-states on an engine that replays (no disk cache): the reference."""
    engine = start(model, adapter, state, max_disk_bytes=0, **overrides)
    try:
        for messages in TURNS[:2]:
            run(engine, job(messages))
        text = answer(run(engine, job(TURNS[2])))
        return text, delta_states(engine.model, session_of(engine).cache)
    finally:
        stop(engine)


def third_turn(
    model: Path, adapter: Path, state: Path, caplog: pytest.LogCaptureFixture, **overrides: Any
) -> tuple[str, dict[str, Any]]:
    """The third turn's answer on a new engine over `state` (its disk cache's log captured), and its stats."""
    engine = start(model, adapter, state, **overrides)
    try:
        with caplog.at_level(logging.INFO, logger="sidecar.kvcache.disk_cache"):
            text = answer(run(engine, job(TURNS[2])))
        return text, engine.kv_disk.stats()
    finally:
        stop(engine)


def assert_states_equal(a: list[mx.array], b: list[mx.array]) -> None:
    for x, y in zip(a, b, strict=True):
        assert float(mx.max(mx.abs(x - y))) < 1e-5


@pytest.mark.parametrize(
    ("kv_bits", "model", "adapter"),
    [
        (None, "tiny_model_dir", "tiny_adapter_dir"),
        (None, "tiny_model_dir", "tiny_ssw_adapter_dir"),  # message-mean writes: cut only between messages
        (8, "tiny_kv_model_dir", "tiny_kv_adapter_dir"),
    ],
)
def test_a_restarted_engine_takes_sessions_from_disk_and_answers_as_a_replay(
    request: pytest.FixtureRequest, tmp_path: Path, kv_bits: int | None, model: str, adapter: str
) -> None:
    model_dir, adapter_dir = request.getfixturevalue(model), request.getfixturevalue(adapter)
    engine = two_turns_then_restart(model_dir, adapter_dir, tmp_path / "state", kv_bits=kv_bits)
    try:
        events = run(engine, job(TURNS[2]))
        done = prompt_done(events)
        # Only the new turn's tokens (plus at most the 63 before the last kept δ-state) were prefilled.
        assert done.prompt_tokens - done.cached_tokens < 64 + 40
        run(engine, job(TURNS[2], key="s2"))
        disk = engine.kv_disk.stats()
        assert disk["hits"] == 2 and disk["fallbacks"] == 0
        assert disk["prefix_loads"] == 1  # the shared prefix was read once, then taken from memory
        assert engine.replays.checks >= 1 and engine.replays.mismatches == 0  # δ-states as saved
        states = delta_states(engine.model, session_of(engine).cache)
        text = answer(events)
    finally:
        stop(engine)
    reference, reference_states = replayed(model_dir, adapter_dir, tmp_path / "reference", kv_bits=kv_bits)
    assert text == reference
    assert_states_equal(states, reference_states)


def chunk_files(state: Path) -> list[Path]:
    return sorted((state / "kv" / "sessions").glob("*/*.safetensors"))


def kv_bound_for_one_session(model: Path, adapter: Path, state: Path) -> int:
    """A --max-kv-bytes that holds the shared prefix and one two-turn session referencing it (as the
    memory guard counts it), not two."""
    probe = start(model, adapter, state)
    try:
        for messages in TURNS[:2]:
            run(probe, job(messages))
        session = session_of(probe)
        own = probe.guard.session_bytes(len(session.tokens) + 64, 32, shared=shared_prefix_of(session.cache).length)
        return probe.memory.shared_bytes() + own + probe.guard.step_bytes()  # a session read back may hold a step more
    finally:
        stop(probe)


@pytest.mark.parametrize("bound", ["max_kv_bytes", "max_sessions"])
def test_an_evicted_session_comes_back_from_disk_not_by_replay(
    tiny_model_dir: Path, tiny_adapter_dir: Path, tmp_path: Path, bound: str
) -> None:
    if bound == "max_kv_bytes":
        limit = kv_bound_for_one_session(tiny_model_dir, tiny_adapter_dir, tmp_path / "probe")
    else:
        limit = 1
    engine = start(tiny_model_dir, tiny_adapter_dir, tmp_path / "state", **{bound: limit})
    try:
        for messages in TURNS[:2]:
            run(engine, job(messages))
        run(engine, job(TURNS[1], key="other"))  # evicts s1 from memory: no room for two sessions
        assert engine.store.evictions >= 1 and session_of(engine).cache is None
        events = run(engine, job(TURNS[2]))
        done = prompt_done(events)
        assert engine.kv_disk.stats()["hits"] == 1
        assert done.prompt_tokens - done.cached_tokens < 64 + 40
        text = answer(events)
    finally:
        stop(engine)
    assert text == replayed(tiny_model_dir, tiny_adapter_dir, tmp_path / "reference")[0]


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_a_damaged_chunk_is_replayed_with_a_log_line_saying_why(
    tiny_model_dir: Path, tiny_adapter_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    first = start(tiny_model_dir, tiny_adapter_dir, tmp_path / "state")
    for messages in TURNS[:2]:
        run(first, job(messages))
    stop(first)
    newest = chunk_files(tmp_path / "state")[-1]
    data = newest.read_bytes()
    if damage == "truncate":
        newest.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        newest.write_bytes(data[:-9] + bytes([data[-9] ^ 0xFF]) + data[-8:])
    else:
        newest.unlink()
    text, stats = third_turn(tiny_model_dir, tiny_adapter_dir, tmp_path / "state", caplog)
    assert stats["hits"] == 0 and stats["partial_hits"] == 1  # the chunks before the damaged one were used
    reason = "cannot be read" if damage == "delete" else "fails its checksum"
    assert any(reason in r.getMessage() and "replayed" in r.getMessage() for r in caplog.records)
    assert text == replayed(tiny_model_dir, tiny_adapter_dir, tmp_path / "reference")[0]


def test_files_written_for_another_kv_format_are_not_used(
    tiny_kv_model_dir: Path, tiny_kv_adapter_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = start(tiny_kv_model_dir, tiny_kv_adapter_dir, tmp_path / "state")
    for messages in TURNS[:2]:
        run(first, job(messages))
    stop(first)
    text, stats = third_turn(tiny_kv_model_dir, tiny_kv_adapter_dir, tmp_path / "state", caplog, kv_bits=8)
    assert stats["hits"] == 0 and stats["partial_hits"] == 0 and stats["fallbacks"] == 1
    assert any("another model, adapter or KV format" in r.getMessage() for r in caplog.records)
    assert text == replayed(tiny_kv_model_dir, tiny_kv_adapter_dir, tmp_path / "reference", kv_bits=8)[0]


def test_a_full_disk_fails_no_turn_and_the_files_catch_up_afterwards(
    tiny_model_dir: Path, tiny_adapter_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(path: Path, data: bytes) -> str:
        raise OSError(errno.ENOSPC, "No space left on device")

    engine = start(tiny_model_dir, tiny_adapter_dir, tmp_path / "state")
    run(engine, job(TURNS[0]))
    asyncio.run(engine.save_session(hash_session_key("s1")))  # returns once the session's chunks are written
    with monkeypatch.context() as patch:
        patch.setattr(disk_files, "write_chunk_file", full)
        events = run(engine, job(TURNS[1]))
        stop(engine)  # waits for the writer: the failure is counted
    assert isinstance(events[-1], Finished) and events[-1].finish_reason in ("stop", "length")
    stats = engine.kv_disk.stats()
    assert stats["write_failures"] == 1 and stats["last_error"] == "the disk is full"
    # Nothing of turn 2 reached the disk; the next server restores turn 1's files and replays the rest.
    engine = start(tiny_model_dir, tiny_adapter_dir, tmp_path / "state")
    try:
        text = answer(run(engine, job(TURNS[2])))
        assert engine.kv_disk.stats()["partial_hits"] == 1
    finally:
        stop(engine)
    assert text == replayed(tiny_model_dir, tiny_adapter_dir, tmp_path / "reference")[0]


def test_the_budget_evicts_the_least_recently_used_session_from_disk(
    tiny_model_dir: Path, tiny_adapter_dir: Path, tmp_path: Path
) -> None:
    probe = start(tiny_model_dir, tiny_adapter_dir, tmp_path / "probe")
    run(probe, job(TURNS[0]))
    stop(probe)
    kv = tmp_path / "probe" / "kv"
    prefix, own = (sum(p.stat().st_size for p in kv.glob(pattern)) for pattern in ("prefixes/*.*", "sessions/*/*.*"))
    budget = prefix + int(own * 1.5)  # room for the shared prefix and one session, not two
    engine = start(tiny_model_dir, tiny_adapter_dir, tmp_path / "state", max_disk_bytes=budget)
    try:
        run(engine, job(TURNS[0], key="old"))
        run(engine, job(TURNS[0], key="new"))
    finally:
        stop(engine)
    stats = engine.kv_disk.stats()
    assert stats["evictions"] >= 1 and stats["bytes"] <= budget
    folders = [p.name for p in (tmp_path / "state" / "kv" / "sessions").iterdir()]
    assert folders == [session_of(engine, "new").file_stem]


def test_the_shared_prefix_is_stored_once_and_deleting_a_session_removes_its_files(
    tiny_model_dir: Path, tiny_adapter_dir: Path, tmp_path: Path
) -> None:
    engine = start(tiny_model_dir, tiny_adapter_dir, tmp_path / "state")
    for key in ("a", "b"):
        run(engine, job(TURNS[0], key=key))
    stop(engine)
    kv = tmp_path / "state" / "kv"
    assert len(list((kv / "prefixes").glob("*.safetensors"))) == 1
    manifests = [json.loads(p.read_text()) for p in (kv / "sessions").glob("*/manifest.json")]
    assert len(manifests) == 2 and all(m["chunks"][0]["prefix"] for m in manifests)
    assert all(len(m["chunks"]) == 2 and m["chunks"][0]["end"] == m["chunks"][1]["start"] for m in manifests)
    assert sorted(p.name for p in (kv / "sessions").iterdir()) == sorted(map(session_of_stem, "ab"))  # hashed keys
    engine = start(tiny_model_dir, tiny_adapter_dir, tmp_path / "state")
    try:
        assert asyncio.run(engine.reset_session(hash_session_key("a")))
        assert not (kv / "sessions" / session_of_stem("a")).exists()
        assert (kv / "sessions" / session_of_stem("b")).exists()
    finally:
        stop(engine)


def session_of_stem(key: str) -> str:
    return f"{hash_session_key(key)}.delta"


@pytest.mark.parametrize("plain", ["no adapter", "delta off"])
def test_sessions_without_delta_are_restored_too(
    tiny_model_dir: Path, tiny_adapter_dir: Path, tmp_path: Path, plain: str
) -> None:
    adapter = None if plain == "no adapter" else tiny_adapter_dir  # the smoke preset; X-Delta-Mode: base
    first = start(tiny_model_dir, adapter, tmp_path / "state")
    for messages in TURNS[:2]:
        run(first, job(messages, delta_enabled=False))
    stop(first)
    engine = start(tiny_model_dir, adapter, tmp_path / "state")
    try:
        events = run(engine, job(TURNS[2], delta_enabled=False))
        assert engine.kv_disk.stats()["hits"] == 1
    finally:
        stop(engine)
    reference = start(tiny_model_dir, adapter, tmp_path / "reference", max_disk_bytes=0)
    try:
        for messages in TURNS[:2]:
            run(reference, job(messages, delta_enabled=False))
        assert answer(events) == answer(run(reference, job(TURNS[2], delta_enabled=False)))
    finally:
        stop(reference)
