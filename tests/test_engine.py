"""The engine on a tiny generated model: every token written once, rollback, memory writes, persistence."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache

from sidecar.config import SidecarSettings
from sidecar.delta.api import delta_states, set_delta_controls, write_context
from sidecar.engine import Engine, load_engine
from sidecar.engine_io import ChatJob, ChatMessage, Failed, Finished, PromptDone, TextDelta
from sidecar.session_keys import hash_session_key

SYSTEM = "You are a careful assistant with tools. " * 30


def _settings(model_dir: Path, adapter_dir: Path | None, state_dir: Path, **overrides: Any) -> SidecarSettings:
    overrides.setdefault("context_window", 4096)
    return SidecarSettings(
        model_path=str(model_dir),
        model_id="tiny",
        adapter_path=str(adapter_dir) if adapter_dir else None,
        state_dir=str(state_dir),
        **overrides,
    )


@pytest.fixture
def engine_factory(tiny_model_dir: Path, tiny_adapter_dir: Path, tmp_path: Path):
    engines: list[Engine] = []

    def make(adapter: Path | None = tiny_adapter_dir, **overrides: Any) -> Engine:
        engine = load_engine(_settings(tiny_model_dir, adapter, tmp_path / "state", **overrides))
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        asyncio.run(engine.close())


def _job(messages: list[tuple[str, str]], key: str = "s1", **kw: Any) -> ChatJob:
    kw.setdefault("max_tokens", 8)
    return ChatJob(session_key=key, messages=tuple(ChatMessage(r, c) for r, c in messages), **kw)  # type: ignore[arg-type]


def _run(engine: Engine, job: ChatJob) -> list[Any]:
    async def collect() -> list[Any]:
        return [event async for event in engine.submit(job)]

    return asyncio.run(collect())


def _openclaw_turns(n: int) -> list[list[tuple[str, str]]]:
    """n request histories shaped like OpenClaw's: each ends with an internal-context message that the next drops."""
    turns, history = [], [("system", SYSTEM)]
    for i in range(n):
        history = history + [("user", f"question number {i}: what about item {i * 7}?")]
        turns.append(history + [("user", f"[internal context for turn {i}] recalled notes {i}")])
        history = history + [("assistant", f"answer {i}")]
    return turns


def _session(engine: Engine, key: str = "s1", delta: bool = True):
    return engine.store.peek(hash_session_key(key), delta)


def _one_shot_states(engine: Engine, session) -> list[mx.array]:
    """The δ-states from a single fresh pass over the session's final tokens, memory writes at their offsets."""
    cache = make_prompt_cache(engine.model)
    done = 0
    for context in session.contexts:
        if context.offset > done:
            engine.model(mx.array([session.tokens[done : context.offset]]), cache=cache)
            done = context.offset
        write_context(engine.model, cache, list(context.tokens))
    engine.model(mx.array([session.tokens[done:]]), cache=cache)
    return delta_states(engine.model, cache)


def _assert_states_close(a: list[mx.array], b: list[mx.array]) -> None:
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(np.array(x), np.array(y), atol=1e-4, rtol=1e-4)


def test_every_token_is_written_exactly_once_over_openclaw_turns(engine_factory) -> None:
    engine = engine_factory()
    for i, messages in enumerate(_openclaw_turns(5)):
        events = _run(engine, _job(messages, snippets=(f"note {i % 2}: the user likes tea",)))
        done = events[0]
        assert isinstance(done, PromptDone)
        if i > 0:
            # Everything up to the dropped internal-context message was reused.
            assert done.cached_tokens > done.prompt_tokens // 2
        assert isinstance(events[-1], Finished)
    session = _session(engine)
    assert len(session.contexts) >= 2
    _assert_states_close(delta_states(engine.model, session.cache), _one_shot_states(engine, session))


def test_without_memory_writes_the_state_is_a_plain_one_shot_pass(engine_factory) -> None:
    engine = engine_factory()
    for messages in _openclaw_turns(3):
        _run(engine, _job(messages))
    session = _session(engine)
    assert session.contexts == []
    cache = make_prompt_cache(engine.model)
    engine.model(mx.array([session.tokens]), cache=cache)
    _assert_states_close(delta_states(engine.model, session.cache), delta_states(engine.model, cache))


def test_a_retried_request_does_not_write_its_snippets_twice(engine_factory) -> None:
    engine = engine_factory()
    job = _job(_openclaw_turns(1)[0], snippets=("the user has a cat named Io",), temperature=0.0)
    first = _run(engine, job)
    states_after_first = [np.array(s) for s in delta_states(engine.model, _session(engine).cache)]
    retry = _run(engine, job)
    assert first[0].snippets_written == 1 and retry[0].snippets_written == 0
    assert retry[0].cached_tokens == retry[0].prompt_tokens - 1
    assert len(_session(engine).contexts) == 1
    # Same prompt, same memory, greedy decoding: the same answer and the same final state.
    assert [e for e in first if isinstance(e, TextDelta)] == [e for e in retry if isinstance(e, TextDelta)]
    _assert_states_close([mx.array(s) for s in states_after_first], delta_states(engine.model, _session(engine).cache))


def test_sessions_are_isolated_and_base_mode_is_its_own_session(engine_factory) -> None:
    engine = engine_factory()
    turns = _openclaw_turns(2)
    _run(engine, _job(turns[0], key="alice", snippets=("alice likes tea",)))
    _run(engine, _job(turns[0], key="bob"))
    _run(engine, _job(turns[1], key="alice", snippets=("alice has a dog",)))
    _run(engine, _job(turns[0], key="alice", delta_enabled=False))
    # Each session's memory is exactly what its own history writes: no cross-talk.
    for key in ("alice", "bob"):
        session = _session(engine, key)
        _assert_states_close(delta_states(engine.model, session.cache), _one_shot_states(engine, session))
    assert len(_session(engine, "alice").contexts) == 2 and _session(engine, "bob").contexts == []
    base = _session(engine, "alice", delta=False)
    assert base is not None and base.contexts == [] and all(s.kind == "plain" for s in base.segments)


def test_an_evicted_session_is_rebuilt_exactly_from_disk(engine_factory) -> None:
    engine = engine_factory(max_sessions=1)
    turns = _openclaw_turns(3)
    _run(engine, _job(turns[0], key="a", snippets=("a fact about a",)))
    _run(engine, _job(turns[1], key="a", snippets=("another fact about a",)))
    before = [np.array(s) for s in delta_states(engine.model, _session(engine, "a").cache)]
    _run(engine, _job(turns[0], key="b"))  # evicts "a"
    assert engine.store.evictions == 1 and _session(engine, "a").cache is None

    events = _run(engine, _job(turns[2], key="a"))
    assert events[0].cached_tokens == 0  # its KV had to be rebuilt
    reference = engine_factory()  # a fresh engine replaying the same requests without eviction
    for turn, snippet in ((turns[0], "a fact about a"), (turns[1], "another fact about a")):
        _run(reference, _job(turn, key="a", snippets=(snippet,)))
    _run(reference, _job(turns[2], key="a"))
    _assert_states_close(delta_states(engine.model, _session(engine, "a").cache), delta_states(reference.model, _session(reference, "a").cache))
    assert before  # the saved state was read back and checked against the replay


def test_a_restarted_server_continues_a_session(engine_factory) -> None:
    turns = _openclaw_turns(2)
    first = engine_factory()
    _run(first, _job(turns[0], snippets=("remember the blue door",)))
    states = [np.array(s) for s in delta_states(first.model, _session(first).cache)]
    asyncio.run(first.close())

    second = engine_factory()
    stats = asyncio.run(second.session_stats("s1"))
    assert stats["delta"]["memory_writes"] == 1
    for saved, layer in zip(states, stats["delta"]["delta_state"]):
        assert layer["norm"] == pytest.approx(float(np.linalg.norm(saved)), rel=1e-5)
    events = _run(second, _job(turns[1]))
    assert isinstance(events[-1], Finished) and events[-1].finish_reason != "cancelled"
    assert len(_session(second).contexts) == 1


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_a_damaged_session_file_is_ignored(engine_factory, tmp_path: Path, damage: str) -> None:
    engine = engine_factory()
    _run(engine, _job(_openclaw_turns(1)[0]))
    asyncio.run(engine.close())
    path = next((tmp_path / "state").glob("*.session.npz"))
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x00junk" * 100, "empty": b""}[damage])

    fresh = engine_factory()
    assert asyncio.run(fresh.session_stats("s1")) is None
    events = _run(fresh, _job(_openclaw_turns(1)[0]))
    assert events[0].cached_tokens == 0 and isinstance(events[-1], Finished)


def test_stop_strings_and_token_limits(engine_factory) -> None:
    engine = engine_factory()
    free = _run(engine, _job([("user", "say something")], key="free", max_tokens=20, temperature=0.0))
    text = "".join(e.text for e in free if isinstance(e, TextDelta))
    assert free[-1].completion_tokens <= 20
    if len(text) < 6:
        pytest.skip("the tiny model stopped too early to pick a stop string")
    stop = text[3:6]
    cut = _run(engine, _job([("user", "say something")], key="cut", max_tokens=20, temperature=0.0, stop=(stop,)))
    assert "".join(e.text for e in cut if isinstance(e, TextDelta)) == text[: text.index(stop)]
    assert cut[-1].finish_reason == "stop"


def test_a_prompt_longer_than_the_window_fails_cleanly(engine_factory) -> None:
    engine = engine_factory(context_window=300)
    events = _run(engine, _job([("system", SYSTEM * 3), ("user", "hi")]))
    assert isinstance(events[-1], Failed) and events[-1].status == 400
    assert events[-1].code == "context_length_exceeded"


def test_cancelling_frees_the_worker(engine_factory) -> None:
    engine = engine_factory()

    async def scenario() -> tuple[list[Any], list[Any]]:
        stream = engine.submit(_job([("user", "tell me a long story")], key="slow", max_tokens=400))
        first = await stream.__anext__()
        stream.cancel()
        rest = [first] + [e async for e in stream]
        after = [e async for e in engine.submit(_job([("user", "hi")], key="next"))]
        return rest, after

    cancelled, after = asyncio.run(scenario())
    assert cancelled[-1].finish_reason == "cancelled"
    assert cancelled[-1].completion_tokens < 400
    assert isinstance(after[-1], Finished)


def test_skip_system_policy_reads_but_never_writes_the_system_prompt(engine_factory) -> None:
    engine = engine_factory(write_policy="skip-system")
    messages = [("system", SYSTEM), ("user", "hello")]
    _run(engine, _job(messages))
    session = _session(engine)
    read_only = [s for s in session.segments if s.kind == "read"]
    assert read_only and read_only[0].start == 0
    # After the system prompt the memory is still empty.
    cache = make_prompt_cache(engine.model)
    set_delta_controls(cache, write=False)
    engine.model(mx.array([session.tokens[: read_only[0].end]]), cache=cache)
    assert all(float(mx.abs(s).max()) == 0.0 for s in delta_states(engine.model, cache))
    assert any(float(mx.abs(s).max()) > 0 for s in delta_states(engine.model, session.cache))


def test_a_model_without_adapter_serves_plain_sessions(engine_factory) -> None:
    engine = engine_factory(adapter=None)
    events = _run(engine, _job([("user", "hi")], snippets=("ignored without δ",)))
    assert events[0].snippets_written == 0 and isinstance(events[-1], Finished)
    assert engine.info.adapter is None and _session(engine, delta=False) is not None
