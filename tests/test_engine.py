"""The engine on a tiny generated model: every token written once, rollback, memory writes, persistence."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest
from engine_support import SYSTEM, job, one_shot_states, openclaw_turns, patch_function, run, session_of
from mlx_lm.models.cache import make_prompt_cache

from sidecar.delta.api import delta_states, set_delta_controls
from sidecar.engine import decoding, prompts, rendering
from sidecar.engine.interface import EngineError, Failed, Finished, PromptDone, TextDelta
from sidecar.engine.prompts import render_prompt
from sidecar.sessions.keys import hash_session_key
from sidecar.sessions.replay_check import ReplayChecks


def _assert_states_close(a: list[mx.array], b: list[mx.array]) -> None:
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(np.array(x), np.array(y), atol=1e-4, rtol=1e-4)


def test_every_token_is_written_exactly_once_over_openclaw_turns(engine_factory) -> None:
    engine = engine_factory()
    for i, messages in enumerate(openclaw_turns(5)):
        events = run(engine, job(messages, snippets=(f"note {i % 2}: the user likes tea",)))
        done = events[0]
        assert isinstance(done, PromptDone)
        if i > 0:
            # Everything up to the dropped internal-context message was reused.
            assert done.cached_tokens > done.prompt_tokens // 2
        assert isinstance(events[-1], Finished)
    session = session_of(engine)
    assert len(session.snippet_writes) >= 2
    _assert_states_close(delta_states(engine.model, session.cache), one_shot_states(engine, session))


def test_without_memory_writes_the_state_is_a_plain_one_shot_pass(engine_factory) -> None:
    engine = engine_factory()
    for messages in openclaw_turns(3):
        run(engine, job(messages))
    session = session_of(engine)
    assert session.snippet_writes == []
    cache = make_prompt_cache(engine.model)
    engine.model(mx.array([session.tokens]), cache=cache)
    _assert_states_close(delta_states(engine.model, session.cache), delta_states(engine.model, cache))


def test_a_retried_request_does_not_write_its_snippets_twice(engine_factory) -> None:
    engine = engine_factory()
    request = job(openclaw_turns(1)[0], snippets=("the user has a cat named Io",), temperature=0.0)
    first = run(engine, request)
    states_after_first = [np.array(s) for s in delta_states(engine.model, session_of(engine).cache)]
    retry = run(engine, request)
    assert first[0].snippets_written == 1 and retry[0].snippets_written == 0
    assert retry[0].cached_tokens == retry[0].prompt_tokens - 1
    assert len(session_of(engine).snippet_writes) == 1
    # Same prompt, same memory, greedy decoding: the same answer and the same final state.
    assert [e for e in first if isinstance(e, TextDelta)] == [e for e in retry if isinstance(e, TextDelta)]
    now = delta_states(engine.model, session_of(engine).cache)
    _assert_states_close([mx.array(s) for s in states_after_first], now)


def test_sessions_are_isolated_and_base_mode_is_its_own_session(engine_factory) -> None:
    engine = engine_factory()
    turns = openclaw_turns(2)
    run(engine, job(turns[0], key="alice", snippets=("alice likes tea",)))
    run(engine, job(turns[0], key="bob"))
    run(engine, job(turns[1], key="alice", snippets=("alice has a dog",)))
    run(engine, job(turns[0], key="alice", delta_enabled=False))
    # Each session's memory is exactly what its own history writes: no cross-talk.
    for key in ("alice", "bob"):
        session = session_of(engine, key)
        _assert_states_close(delta_states(engine.model, session.cache), one_shot_states(engine, session))
    assert len(session_of(engine, "alice").snippet_writes) == 2 and session_of(engine, "bob").snippet_writes == []
    base = session_of(engine, "alice", delta=False)
    assert base is not None and base.snippet_writes == [] and all(s.kind == "plain" for s in base.segments)


def test_an_evicted_session_is_rebuilt_exactly_from_disk(engine_factory) -> None:
    engine = engine_factory(max_sessions=1)
    turns = openclaw_turns(3)
    run(engine, job(turns[0], key="a", snippets=("a fact about a",)))
    run(engine, job(turns[1], key="a", snippets=("another fact about a",)))
    run(engine, job(turns[0], key="b"))  # evicts "a"
    assert engine.store.evictions == 1 and session_of(engine, "a").cache is None

    events = run(engine, job(turns[2], key="a"))
    # Its KV came back from the disk cache up to where this turn diverges (the shared system prompt
    # from the prefix cache in memory, the rest from its own chunk), not from a replay.
    disk = asyncio.run(engine.health())["disk_cache"]
    assert (disk["hits"], disk["partial_hits"], disk["fallbacks"], disk["prefix_loads"]) == (1, 0, 0, 0)
    assert 0 < disk["restored_tokens"] == events[0].cached_tokens < events[0].prompt_tokens - 1
    reference = engine_factory(state="reference")  # the same requests on a fresh engine, without eviction
    for turn, snippet in ((turns[0], "a fact about a"), (turns[1], "another fact about a")):
        run(reference, job(turn, key="a", snippets=(snippet,)))
    run(reference, job(turns[2], key="a"))
    rebuilt, fresh = session_of(engine, "a"), session_of(reference, "a")
    _assert_states_close(delta_states(engine.model, rebuilt.cache), delta_states(reference.model, fresh.cache))
    # The replay stopped where the internal-context message began, short of the saved end: it was
    # checked at the last saved message start it passed, and matched.
    assert engine.replays == ReplayChecks(checks=1, mismatches=0)
    assert reference.replays.checks == 0  # nothing was rebuilt there


def test_a_restarted_server_continues_a_session(engine_factory) -> None:
    turns = openclaw_turns(2)
    first = engine_factory()
    run(first, job(turns[0], snippets=("remember the blue door",)))
    states = [np.array(s) for s in delta_states(first.model, session_of(first).cache)]
    asyncio.run(first.close())

    second = engine_factory()
    stats = asyncio.run(second.session_stats(hash_session_key("s1")))
    assert stats["delta"]["memory_writes"] == 1
    for saved, layer in zip(states, stats["delta"]["delta_state"]):
        assert layer["norm"] == pytest.approx(float(np.linalg.norm(saved)), rel=1e-5)
    events = run(second, job(turns[1]))
    assert isinstance(events[-1], Finished) and events[-1].finish_reason != "cancelled"
    assert len(session_of(second).snippet_writes) == 1
    assert second.replays == ReplayChecks(checks=1, mismatches=0)


def test_prompts_are_scanned_for_messages_on_render_threads_only(engine_factory, monkeypatch) -> None:
    # Even a session rebuilt by a replay (no disk cache) finds its message starts in the prompt's layout.
    turns = openclaw_turns(2)
    first = engine_factory(max_disk_bytes=0)
    run(first, job(turns[0]))
    asyncio.run(first.close())
    second = engine_factory(max_disk_bytes=0)
    threads: list[str] = []
    real = prompts.message_start_id

    def recording(tokenizer: Any) -> int | None:
        threads.append(threading.current_thread().name)
        return real(tokenizer)

    monkeypatch.setattr(prompts, "message_start_id", recording)
    events = run(second, job(turns[1]))
    assert isinstance(events[-1], Finished) and second.replays.checks == 1  # the session was rebuilt
    assert threads and all(name.startswith("delta-mem-render") for name in threads), threads


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_a_damaged_session_file_is_ignored(engine_factory, tmp_path: Path, damage: str) -> None:
    engine = engine_factory()
    run(engine, job(openclaw_turns(1)[0]))
    asyncio.run(engine.close())
    path = next((tmp_path / "state").glob("*.session.npz"))
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x00junk" * 100, "empty": b""}[damage])

    fresh = engine_factory()
    assert asyncio.run(fresh.session_stats(hash_session_key("s1"))) is None
    events = run(fresh, job(openclaw_turns(1)[0]))
    # Nothing of the session's history is reused: only the shared system prompt, from the disk cache.
    assert events[0].cached_tokens == fresh.prefixes.stats()["tokens"] > 0 and isinstance(events[-1], Finished)


def test_stop_strings_and_token_limits(engine_factory) -> None:
    engine = engine_factory()
    free = run(engine, job([("user", "say something")], key="free", max_tokens=20, temperature=0.0))
    text = "".join(e.text for e in free if isinstance(e, TextDelta))
    assert free[-1].completion_tokens <= 20
    if len(text) < 6:
        pytest.skip("the tiny model stopped too early to pick a stop string")
    stop = text[3:6]
    cut = run(engine, job([("user", "say something")], key="cut", max_tokens=20, temperature=0.0, stop=(stop,)))
    assert "".join(e.text for e in cut if isinstance(e, TextDelta)) == text[: text.index(stop)]
    assert cut[-1].finish_reason == "stop"


def test_a_prompt_longer_than_the_window_fails_cleanly(engine_factory) -> None:
    engine = engine_factory(context_window=300)
    events = run(engine, job([("system", SYSTEM * 3), ("user", "hi")]))
    assert isinstance(events[-1], Failed) and events[-1].status == 400
    assert events[-1].code == "context_length_exceeded"


def test_cancelling_frees_the_worker(engine_factory) -> None:
    engine = engine_factory()

    async def scenario() -> tuple[list[Any], list[Any]]:
        stream = engine.submit(job([("user", "tell me a long story")], key="slow", max_tokens=400))
        first = await stream.__anext__()
        stream.cancel()
        rest = [first] + [e async for e in stream]
        after = [e async for e in engine.submit(job([("user", "hi")], key="next"))]
        return rest, after

    cancelled, after = asyncio.run(scenario())
    assert cancelled[-1].finish_reason == "cancelled"
    assert cancelled[-1].completion_tokens < 400
    assert isinstance(after[-1], Finished)


def test_skip_system_policy_reads_but_never_writes_the_system_prompt(engine_factory) -> None:
    engine = engine_factory(write_policy="skip-system")
    messages = [("system", SYSTEM), ("user", "hello")]
    run(engine, job(messages))
    session = session_of(engine)
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
    events = run(engine, job([("user", "hi")], snippets=("ignored without δ",)))
    assert events[0].snippets_written == 0 and isinstance(events[-1], Finished)
    assert engine.info.adapter is None and session_of(engine, delta=False) is not None


def test_temporary_files_of_an_interrupted_save_are_cleaned_up(engine_factory, tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    leftover = state / ".abc.delta.session.npz.x1y2.tmp"
    leftover.write_bytes(b"half a file")
    unrelated = state / "notes.txt"
    unrelated.write_text("kept")
    engine_factory()
    assert not leftover.exists() and unrelated.exists()


def test_a_prompt_being_tokenized_holds_up_no_other_session(engine_factory, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = engine_factory(context_window=300)
    started, release = threading.Event(), threading.Event()

    def slow_render(tokenizer: Any, messages: Any, tools: Any) -> list[int]:
        if messages[-1].content.startswith("huge"):
            started.set()
            assert release.wait(60)
        return render_prompt(tokenizer, messages, tools)

    monkeypatch.setattr(rendering, "render_prompt", slow_render)

    async def scenario() -> tuple[list[Any], list[Any]]:
        huge = engine.submit(job([("user", "huge " + "word " * 400)], key="huge"))
        assert await asyncio.to_thread(started.wait, 60)
        # While the huge prompt is still being tokenized, a small chat is answered in full.
        small = await asyncio.wait_for(_collect(engine.submit(job([("user", "hi")], key="small"))), 60)
        release.set()
        return small, await _collect(huge)

    small, huge = asyncio.run(scenario())
    assert isinstance(small[-1], Finished) and small[-1].finish_reason != "cancelled"
    assert isinstance(huge[-1], Failed) and huge[-1].code == "context_length_exceeded" and huge[-1].status == 400


def test_a_prompt_that_fails_to_render_fails_its_request_and_is_counted(engine_factory, monkeypatch) -> None:
    engine = engine_factory()

    def broken_render(tokenizer: Any, messages: Any, tools: Any) -> list[int]:
        if messages[-1].content == "break":
            raise RuntimeError("a bug in the template")
        return render_prompt(tokenizer, messages, tools)

    monkeypatch.setattr(rendering, "render_prompt", broken_render)
    failure = run(engine, job([("user", "break")], key="broken"))[-1]
    assert isinstance(failure, Failed) and (failure.status, failure.code) == (500, "engine_error")
    assert "reading the prompt" in failure.message
    assert run(engine, job([("user", "hello")], key="next"))[-1].finish_reason == "length"
    jobs = asyncio.run(engine.health())["jobs"]
    assert (jobs["failed"], jobs["completed"]) == (1, 1)


def test_a_prompt_too_long_by_its_text_alone_is_refused_without_tokenizing(
    engine_factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = engine_factory(context_window=300)
    rendered: list[int] = []

    def counting_render(tokenizer: Any, messages: Any, tools: Any) -> list[int]:
        rendered.append(len(messages))
        return render_prompt(tokenizer, messages, tools)

    monkeypatch.setattr(rendering, "render_prompt", counting_render)
    longest = max(len(token) for token in engine.tokenizer.get_vocab())
    events = run(engine, job([("user", "x" * (300 * longest))]))
    assert isinstance(events[-1], Failed) and events[-1].code == "context_length_exceeded"
    assert "at least 300 tokens" in events[-1].message and rendered == []
    # Just under the bound the text is tokenized (and here fits).
    assert isinstance(run(engine, job([("user", "hello")]))[-1], Finished) and rendered == [1]


def test_a_session_answering_now_cannot_be_reset_but_can_be_read(engine_factory) -> None:
    engine = engine_factory()

    async def scenario() -> tuple[Any, dict[str, Any], list[Any], bool]:
        stream = engine.submit(job([("user", "tell me a long story")], key="busy", max_tokens=400))
        events = [await stream.__anext__()]
        while not isinstance(events[-1], TextDelta):
            events.append(await stream.__anext__())
        with pytest.raises(EngineError) as refused:
            await engine.reset_session(hash_session_key("busy"))
        # Read between two decode steps, while the answer goes on.
        stats = await engine.session_stats(hash_session_key("busy"))
        stream.cancel()
        events += [event async for event in stream]
        return refused.value, stats, events, await engine.reset_session(hash_session_key("busy"))

    refused, stats, events, reset = asyncio.run(scenario())
    assert (refused.status, refused.code) == (409, "session_busy")
    assert stats["delta"]["tokens"] > events[0].prompt_tokens - 1
    assert events[-1].finish_reason == "cancelled" and events[-1].completion_tokens < 400
    assert reset and session_of(engine, "busy") is None


def test_two_requests_of_one_session_run_one_after_the_other(engine_factory) -> None:
    engine = engine_factory()
    first, second = openclaw_turns(2)
    order: list[str] = []

    async def turn(name: str, messages: list[tuple[str, str]]) -> list[Any]:
        events = []
        async for event in engine.submit(job(messages, max_tokens=12)):
            events.append(event)
            order.append(f"{name}:{type(event).__name__}")
        return events

    async def scenario() -> list[list[Any]]:
        return await asyncio.gather(turn("first", first), turn("second", second))

    _, later = asyncio.run(scenario())
    assert order.index("second:PromptDone") > order.index("first:Finished")
    # The second request found the first one's tokens in the session: it ran after it, not beside it.
    assert later[0].cached_tokens > len(engine.tokenizer.encode(SYSTEM))


def test_seeded_sampling_is_the_rows_own(engine_factory, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = engine_factory()
    sampled = dict(temperature=0.9, top_p=0.95, max_tokens=16)
    batch_sizes: list[int] = []
    rendered, renders = threading.Condition(), [0]
    real_step, real_render = decoding.step, prompts.render_prompt

    def render(tokenizer: Any, messages: Any, tools: Any) -> list[int]:
        prompt = real_render(tokenizer, messages, tools)
        with rendered:
            renders[0] += 1
            rendered.notify_all()
        return prompt

    def counted(model: Any, rows: list[Any]) -> Any:
        if len(batch_sizes) == alone_steps[0]:  # the crowd's first step waits for the crowd's 3 prompts:
            with rendered:  # then they all join while the first row decodes, however the threads run
                assert rendered.wait_for(lambda: renders[0] >= 1 + 3, timeout=60)
        batch_sizes.append(len(rows))
        return real_step(model, rows)

    # The module-level functions the engine steps and renders with.
    patch_function(monkeypatch, decoding, "step", counted)
    patch_function(monkeypatch, prompts, "render_prompt", render)
    alone_steps = [-1]

    async def answers(jobs: list[Any]) -> list[str]:
        results = await asyncio.gather(*(_collect(engine.submit(j)) for j in jobs))
        return ["".join(e.text for e in events if isinstance(e, TextDelta)) for events in results]

    alone = asyncio.run(answers([job([("user", "pick words")], key="a", seed=7, **sampled)]))[0]
    crowd = [
        job([("user", "pick words")], key="b", seed=7, **sampled),
        job([("user", "something else")], key="c", seed=9, **sampled),  # a seed whose answer is no bare EOS
        job([("user", "greedy here")], key="d", max_tokens=16),
    ]
    alone_steps[0] = len(batch_sizes)
    together = asyncio.run(answers(crowd))
    # Same seed, same prompt: the same text, whatever else shares the batch (and rows did share it).
    assert all(len(text) > 0 for text in together)  # no row left at its first token: all three overlap
    assert max(batch_sizes[: alone_steps[0]]) == 1 and max(batch_sizes[alone_steps[0] :]) == 3
    assert together[0] == alone
    other_seed = asyncio.run(answers([job([("user", "pick words")], key="e", seed=8, **sampled)]))[0]
    assert other_seed != alone


async def _collect(stream: Any) -> list[Any]:
    return [event async for event in stream]


def test_a_failure_while_finishing_an_answer_fails_that_request_and_the_engine_goes_on(
    engine_factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = engine_factory()
    real_persist = engine.admin.persist
    broken = {hash_session_key("s1")}

    def persist(session: Any) -> bool:
        if session.key_hash in broken:
            raise RuntimeError("a bug while saving")
        return real_persist(session)

    monkeypatch.setattr(engine.admin, "persist", persist)
    failure = run(engine, job([("user", "hello")], key="s1"))[-1]
    assert isinstance(failure, Failed) and failure.status == 500 and failure.code == "engine_error"
    # The generation thread is still running: the next request is answered.
    assert run(engine, job([("user", "hello")], key="s2"))[-1].finish_reason == "length"
    broken.clear()  # the shutdown saves every session
