"""Hidden memory is written where the request says, whatever the server went through before.

The same conversation with memory snippets on its last turn must give the same answer and the same
δ-states on a fresh server (A), after a turn the client threw away (B), after that and a restart
with the disk cache (C) or with a replay (D): the snippets go just before the request's last user
message, not wherever the session's cache happened to be cut back to (issue 22 F1).
"""

from __future__ import annotations

import asyncio
from typing import Any

import mlx.core as mx
import numpy as np
import pytest
from engine_support import SYSTEM, job, run, session_of

from sidecar.delta.api import delta_states
from sidecar.engine.interface import Finished, PromptDone, TextDelta
from sidecar.engine.prompts import message_spans, render_prompt

FIRST = [("system", SYSTEM), ("user", "what should I plant in a shady corner of the garden?")]
ANSWER = ("assistant", "ferns and hostas do well there, given some water")
SECOND = FIRST + [ANSWER, ("user", "and which of those would survive a dry summer?")]
ABANDONED = FIRST + [ANSWER, ("user", "and which of those flower in the spring, if any?")]
MEMORY = ("the user lives in a dry climate", "the user's garden faces north")


def _answer(events: list[Any]) -> str:
    assert isinstance(events[-1], Finished), events[-1]
    return "".join(e.text for e in events if isinstance(e, TextDelta))


def _second_turn(engine) -> tuple[str, list[np.ndarray], PromptDone]:
    events = run(engine, job(SECOND, snippets=MEMORY, temperature=0.0, max_tokens=12))
    states = [np.array(s) for s in delta_states(engine.model, session_of(engine).cache)]
    return _answer(events), states, events[0]


def _assert_same_states(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x, y, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("adapter", ["tiny_adapter_dir", "tiny_ssw_adapter_dir"])
def test_memory_lands_at_the_same_place_whatever_the_server_went_through(
    engine_factory, request: pytest.FixtureRequest, adapter: str
) -> None:
    adapter_dir = request.getfixturevalue(adapter)
    results = {}

    fresh = engine_factory(adapter=adapter_dir, state="a")
    run(fresh, job(FIRST, max_tokens=12))
    results["A"] = _second_turn(fresh)

    for name, disk in (("B", None), ("C", 1024**3), ("D", 0)):
        first = engine_factory(adapter=adapter_dir, state=name)
        run(first, job(FIRST, max_tokens=12))
        # A completed turn, with memory of its own, whose answer the client then threw away.
        run(first, job(ABANDONED, snippets=("the user dislikes lilies",), max_tokens=12))
        if disk is None:
            results[name] = _second_turn(first)
            continue
        asyncio.run(first.close())
        restarted = engine_factory(adapter=adapter_dir, state=name, max_disk_bytes=disk)
        results[name] = _second_turn(restarted)

    text, states, done = results["A"]
    assert done.snippets_written == len(MEMORY)
    for name in "BCD":
        assert results[name][0] == text, name
        _assert_same_states(results[name][1], states)
        assert results[name][2].snippets_written == len(MEMORY)

    # Where they went: just before the last user message, in every one of those sessions.
    prompt = render_prompt(fresh.tokenizer, job(SECOND).messages, ())
    last_user = [s.start for s in message_spans(fresh.tokenizer, prompt) if s.role == "user"][-1]
    assert [w.offset for w in session_of(fresh).snippet_writes] == [last_user]


def test_a_retry_keeps_one_write_and_other_memory_replaces_it(engine_factory) -> None:
    engine = engine_factory()
    run(engine, job(FIRST, max_tokens=12))
    first_text, first_states, first_done = _second_turn(engine)
    retry_text, retry_states, retry_done = _second_turn(engine)
    assert first_done.snippets_written == len(MEMORY) and retry_done.snippets_written == 0
    assert retry_text == first_text
    _assert_same_states(retry_states, first_states)
    assert len(session_of(engine).snippet_writes) == 1

    # The same turn sent again with other memory: the first memory goes, the new one takes its place.
    other = ("the user waters twice a week",)
    events = run(engine, job(SECOND, snippets=other, temperature=0.0, max_tokens=12))
    assert events[0].snippets_written == 1
    assert [w.count for w in session_of(engine).snippet_writes] == [1]
    reference = engine_factory(state="reference")
    run(reference, job(FIRST, max_tokens=12))
    expected = run(reference, job(SECOND, snippets=other, temperature=0.0, max_tokens=12))
    assert _answer(events) == _answer(expected)
    _assert_same_states(
        [np.array(s) for s in delta_states(engine.model, session_of(engine).cache)],
        [np.array(s) for s in delta_states(reference.model, session_of(reference).cache)],
    )


def test_memory_before_the_first_message_can_be_replaced(engine_factory) -> None:
    engine = engine_factory()
    only_user = [("user", "hello there, what is new today?")]
    run(engine, job(only_user, snippets=("first memory",)))
    assert [w.offset for w in session_of(engine).snippet_writes] == [0]
    run(engine, job(only_user, snippets=("second memory",), temperature=0.0))
    session = session_of(engine)
    assert len(session.snippet_writes) == 1
    reference = engine_factory(state="reference")
    run(reference, job(only_user, snippets=("second memory",), temperature=0.0))
    assert session.snippet_writes == session_of(reference).snippet_writes
    expected = delta_states(reference.model, session_of(reference).cache)
    for x, y in zip(delta_states(engine.model, session.cache), expected, strict=True):
        assert float(mx.max(mx.abs(x - y))) < 1e-6
