"""The replay check: a rebuilt session's δ-state is compared with the one its file saved.

The saved states are corrupted on purpose: a check that never runs, or compares the wrong point,
lets them through.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from engine_support import job, openclaw_turns, run, session_of

from sidecar.delta.api import delta_states, delta_states_at, restorable_offset
from sidecar.engine.prompts import message_start_id
from sidecar.sessions.files import SessionFileError, load_session_file, save_session_file
from sidecar.sessions.keys import hash_session_key
from sidecar.sessions.replay_check import MAX_CHECKPOINTS, ReplayChecks, checkpoint_offsets, checkpoint_states
from sidecar.sessions.state import Segment, Session

CORRUPTED_LAYER = 1
SNIPPETS = ("a fact about a", "another fact about a")


def test_checkpoints_are_the_last_message_starts() -> None:
    start = 7
    tokens = [start, 1, 2, start, 3, start, 4]
    assert checkpoint_offsets(tokens, start) == [3, 5]  # offset 0 holds the zero state: nothing to check
    assert checkpoint_offsets(tokens, None) == []
    many = [start, 1] * (MAX_CHECKPOINTS + 5)
    assert checkpoint_offsets(many, start) == list(range(10, len(many), 2))
    assert len(checkpoint_offsets(many, start)) == MAX_CHECKPOINTS


def _session() -> Session:
    return Session("ab" * 32, True, tokens=list(range(10)), segments=[Segment(0, 10, "write")])


def test_session_files_keep_their_checkpoints(tmp_path: Path) -> None:
    path = tmp_path / "s.session.npz"
    states = [np.full((1, 8, 8), 1.0, np.float32), np.full((1, 8, 8), 2.0, np.float32)]
    checkpoints = {4: [s * 0.25 for s in states], 7: [s * 0.5 for s in states]}
    save_session_file(path, _session(), "fp", states, checkpoints)
    loaded = load_session_file(path, "fp")
    assert sorted(loaded.saved_checkpoints) == [4, 7]
    for offset, layers in checkpoints.items():
        for saved, expected in zip(loaded.saved_checkpoints[offset], layers, strict=True):
            np.testing.assert_array_equal(saved, expected)
    # A file written before checkpoints existed still loads, with none.
    with np.load(path, allow_pickle=False) as data:
        older = {name: data[name] for name in data.files if not name.startswith("checkpoint")}
    np.savez(path, **older)
    assert load_session_file(path, "fp").saved_checkpoints == {}


@pytest.mark.parametrize("offsets", [[0], [11], [7, 4], [4, 4]], ids=["zero", "past-the-end", "unsorted", "twice"])
def test_impossible_checkpoint_offsets_are_refused(tmp_path: Path, offsets: list[int]) -> None:
    path = tmp_path / "s.session.npz"
    states = [np.zeros((1, 8, 8), np.float32)]
    save_session_file(path, _session(), "fp", states, {})
    with np.load(path, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    arrays["checkpoint_offsets"] = np.asarray(offsets, np.int32)
    arrays["checkpoint_0"] = np.zeros((len(offsets), 1, 8, 8), np.float32)
    np.savez(path, **arrays)
    with pytest.raises(SessionFileError, match="checkpoint offsets"):
        load_session_file(path, "fp")


def _corrupt(path: Path, layer: int) -> None:
    """Shift one layer's saved δ-states, at every checkpoint and at the end."""
    with np.load(path, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    assert arrays["checkpoint_offsets"].size > 0
    for name in (f"state_{layer}", f"checkpoint_{layer}"):
        arrays[name] = arrays[name] + np.float32(0.5)
    np.savez(path, **arrays)


def _reference_states(engine_factory) -> list[mx.array]:
    """The states of session "a" after three turns on an engine that never rebuilt it."""
    reference = engine_factory(state="reference")
    turns = openclaw_turns(3)
    for turn, snippet in zip(turns, (*SNIPPETS, None)):
        run(reference, job(turn, key="a", snippets=(snippet,) if snippet else ()))
    assert reference.replays.checks == 0
    return delta_states(reference.model, session_of(reference, "a").cache)


def _assert_caught(engine, caplog: pytest.LogCaptureFixture, reference: list[mx.array]) -> None:
    assert engine.replays == ReplayChecks(checks=1, mismatches=1)
    health = asyncio.run(engine.health())["sessions"]
    assert (health["replay_checks"], health["replay_mismatches"]) == (1, 1)
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "sidecar.sessions.replay_check"]
    assert warning.startswith(f"session {hash_session_key('a')[:12]}: replayed δ-state of layer {CORRUPTED_LAYER} ")
    assert "keeping the replayed state" in warning
    # The replayed state is what the tokens produce: it is kept, so the session is right again.
    for now, expected in zip(delta_states(engine.model, session_of(engine, "a").cache), reference, strict=True):
        np.testing.assert_allclose(np.array(now), np.array(expected), atol=1e-4)


def test_a_corrupted_state_is_caught_when_an_evicted_session_is_rebuilt(
    engine_factory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    reference = _reference_states(engine_factory)
    engine = engine_factory(max_sessions=1)
    turns = openclaw_turns(3)
    for turn, snippet in zip(turns, SNIPPETS):
        run(engine, job(turn, key="a", snippets=(snippet,)))
    run(engine, job(turns[0], key="b"))  # evicts "a"
    assert session_of(engine, "a").cache is None
    _corrupt(tmp_path / "state" / f"{hash_session_key('a')}.delta.session.npz", CORRUPTED_LAYER)

    with caplog.at_level(logging.WARNING, logger="sidecar.sessions.replay_check"):
        run(engine, job(turns[2], key="a"))
    _assert_caught(engine, caplog, reference)


def test_a_corrupted_state_is_caught_when_a_restarted_server_rebuilds_a_session(
    engine_factory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    reference = _reference_states(engine_factory)
    first = engine_factory()
    turns = openclaw_turns(3)
    for turn, snippet in zip(turns, SNIPPETS):
        run(first, job(turn, key="a", snippets=(snippet,)))
    asyncio.run(first.close())
    _corrupt(tmp_path / "state" / f"{hash_session_key('a')}.delta.session.npz", CORRUPTED_LAYER)

    second = engine_factory()
    with caplog.at_level(logging.WARNING, logger="sidecar.sessions.replay_check"):
        run(second, job(turns[2], key="a"))
    _assert_caught(second, caplog, reference)


def test_checkpoints_the_delta_record_did_not_keep_are_left_out(engine_factory) -> None:
    # A `<|im_start|>` the model generates lies between the states the sparse δ record keeps.
    engine = engine_factory()
    run(engine, job(openclaw_turns(1)[0], max_tokens=40))
    session = session_of(engine)
    kept = checkpoint_offsets(session.tokens, message_start_id(engine.tokenizer))[0]  # prefilled: kept
    answer = range(len(session.tokens) - 40, len(session.tokens))
    unkept = next(o for o in answer if restorable_offset(session.cache, o) < o)
    states = checkpoint_states(engine.model, session.cache, [kept, unkept])
    assert list(states) == [kept]
    for saved, now in zip(states[kept], delta_states_at(engine.model, session.cache, kept), strict=True):
        np.testing.assert_array_equal(saved, np.array(now))
