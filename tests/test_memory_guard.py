"""Sessions per gigabyte in the engine: quantized KV kept exact, a sparse δ record, and a KV budget
the engine never exceeds (evictions before prefill, 413 for a request that cannot fit, a failed
allocation that fails one request and leaves the engine healthy)."""

from __future__ import annotations

import asyncio
import gc
import threading
from collections.abc import Iterator
from typing import Any

import mlx.core as mx
import numpy as np
import pytest
from engine_support import SYSTEM, job, one_shot_states, openclaw_turns, patch_function, run, session_of

from common.kv_budget import (
    DELTA_RECORD_INTERVAL,
    MIB,
    KvShape,
    cache_tokens,
    delta_record_bytes,
    kv_bytes_per_token,
    model_weight_bytes,
)
from sidecar.delta.api import delta_states
from sidecar.engine import decoding, prompts
from sidecar.engine.interface import Failed, Finished, PromptDone, TextDelta
from sidecar.engine.memory_guard import (
    WORKING_BYTES,
    Holding,
    KvGuard,
    KvHoldings,
    RequestSize,
    answering_bytes,
    effective_budget,
    eviction_plan,
    is_allocation_failure,
)
from sidecar.engine.prompt_layout import analyse_prompt
from sidecar.engine.prompts import message_starts, render_prompt
from sidecar.sessions.keys import hash_session_key
from sidecar.sessions.state import common_prefix


def _answer(events: list[Any]) -> str:
    assert isinstance(events[-1], Finished), events[-1]
    return "".join(e.text for e in events if isinstance(e, TextDelta))


def _assert_states_close(a: list[mx.array], b: list[mx.array]) -> None:
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(np.array(x), np.array(y), atol=1e-4, rtol=1e-4)


def _held(engine) -> int:
    return engine.memory.held_bytes()


# ---- the arithmetic, without a model ----------------------------------------------------------


def test_eviction_plan_drops_the_fewest_oldest_holdings_or_all() -> None:
    held = KvHoldings(0, [Holding("a", 40), Holding("b", 30), Holding("c", 20)], {})
    assert eviction_plan(10, 100, held) == []
    assert eviction_plan(30, 100, held) == ["a"]
    assert eviction_plan(75, 100, held) == ["a", "b"]
    assert eviction_plan(85, 100, held) == ["a", "b", "c"]
    assert eviction_plan(101, 100, held) == ["a", "b", "c"]  # cannot fit: every idle holding goes
    assert eviction_plan(20, 100, KvHoldings(70, held.idle, {})) == ["a", "b", "c"]  # the answering stay


def test_a_shared_prefix_is_freed_only_when_nothing_references_it() -> None:
    # P (50 bytes) is referenced by idle sessions a and b and listed by the prefix cache; Q (30) by the
    # answering session only; R (20) by its entry only.
    idle = [Holding("a", 10, "P"), Holding("b", 10, "P"), Holding("P entry", 0, "P"), Holding("R entry", 0, "R")]
    held = KvHoldings(answering=15, idle=idle, prefixes={"P": 50, "Q": 30, "R": 20}, pinned=["Q"])
    assert held.total == 15 + 20 + 100
    assert eviction_plan(0, 135, held) == []
    assert eviction_plan(10, 135, held) == ["a"]  # a's own 10 bytes; P stays for b and the entry
    assert eviction_plan(25, 135, held) == ["a", "b", "P entry"]  # the entry's drop frees P's 50
    assert eviction_plan(75, 135, held) == ["a", "b", "P entry", "R entry"]
    # The answering session's Q and its own bytes stay whatever is needed.
    assert eviction_plan(1000, 135, held) == ["a", "b", "P entry", "R entry"]
    # A prefix entry that a session still references frees nothing: it is kept, and the next one goes.
    entry_first = KvHoldings(0, [Holding("P entry", 0, "P"), Holding("R entry", 0, "R"), Holding("a", 10, "P")],
                             {"P": 50, "R": 20})  # fmt: skip
    assert eviction_plan(10, 80, entry_first) == ["R entry"]
    assert eviction_plan(30, 80, entry_first) == ["R entry", "a"]  # a was P's last reference but the entry
    pinned = KvHoldings(0, [Holding("P entry", 0, "P"), Holding("a", 10, "P")], {"P": 50}, pinned=["P"])
    assert eviction_plan(100, 60, pinned) == ["a"]  # an answering session references P: it stays


def test_a_request_from_a_shared_prefix_needs_room_for_its_own_tokens_only() -> None:
    shape = KvShape(layers=2, kv_heads=2, head_dim=16, dtype_bytes=4, delta_layers=2, delta_state_floats=64)
    guard = KvGuard(shape, 10**9, None, 64)
    per_token = kv_bytes_per_token(shape)
    # The δ record counts a step (64 states) more: one read back from disk, or copied from a prefix read
    # back from disk, holds its states exactly and grows a step at a time from there.
    delta = delta_record_bytes(shape, 1000, 4 + 64)
    alone = guard.request_bytes(RequestSize(1000, 4))
    assert alone == cache_tokens(1000) * per_token + delta
    own = guard.request_bytes(RequestSize(1000, 4, shared=600, prefix="P", prefix_bytes=123))
    assert own == cache_tokens(400) * per_token + delta  # the whole δ record
    snapshot = cache_tokens(600) * per_token + delta_record_bytes(shape, 600, 64)
    assert guard.request_bytes(RequestSize(1000, 4, snapshot=600)) == alone + snapshot
    # Buffers that are not whole steps (read back from disk) may hold one K/V step more.
    assert guard.request_bytes(RequestSize(1000, 4, unaligned=True)) == alone + 256 * per_token
    assert guard.step_bytes() == 256 * per_token
    assert guard.aligned(512 * per_token) and not guard.aligned(300 * per_token)
    # A cache it keeps holds at least what it holds now (buffers never shrink) and what it grows by.
    restored = RequestSize(1000, 4, shared=600, held=own + 1000, held_tokens=900)
    assert guard.request_bytes(restored) == own + 1000 + guard.growth(900, 100, 600)
    step = guard.step_bytes()
    assert guard.request_bytes(RequestSize(1000, 4, shared=600, held=own + 10, held_tokens=900, unaligned=True)) == (
        own + step  # the step is what a cache read back may hold beyond whole steps: not on top of what it holds
    )
    assert guard.request_bytes(RequestSize(1000, 4, shared=600, held=10, held_tokens=900)) == own
    # Growth counts whole cache steps of the own tokens: 600 shared + 256 own fill one step exactly.
    assert guard.growth(856, 1, shared=600) == 256 * per_token
    assert guard.growth(856, 1) == 0


def test_answering_sessions_count_for_their_admitted_room_or_what_they_hold_if_more() -> None:
    rooms = {"a": 100, "b": 50}
    assert answering_bytes(rooms, [("a", 30), ("b", 20), ("b", 45)]) == 100 + 65  # b: both of its modes
    assert answering_bytes(rooms, []) == 150  # a job still rebuilding its cache holds its room
    assert answering_bytes({}, [("c", 10)]) == 10  # the other mode of the session growing now


def test_the_budget_in_force_respects_mlx_memory_limit() -> None:
    assert effective_budget(8 * 1024 * MIB, 64 * 1024 * MIB, 3 * 1024 * MIB) == 8 * 1024 * MIB
    assert effective_budget(8 * 1024 * MIB, 4 * 1024 * MIB, 3 * 1024 * MIB) == 1024 * MIB - WORKING_BYTES
    assert effective_budget(8 * 1024 * MIB, 1024 * MIB, 3 * 1024 * MIB) == 0


def test_allocation_failures_are_told_apart_from_other_errors() -> None:
    assert is_allocation_failure(RuntimeError("[metal::malloc] Attempting to allocate 8589934592 bytes"))
    assert is_allocation_failure(RuntimeError("[malloc] Unable to allocate 4096 bytes."))
    assert is_allocation_failure(MemoryError())
    assert not is_allocation_failure(RuntimeError("[matmul] shapes do not match"))
    assert not is_allocation_failure(ValueError("out of memory"))


# ---- exactness with quantized KV and the sparse δ record --------------------------------------


@pytest.mark.parametrize("bits", [8, 4])
def test_rollback_prefix_cache_eviction_and_restart_give_what_a_fresh_run_gives(
    engine_factory, tiny_kv_model_dir, tiny_kv_adapter_dir, bits
) -> None:
    kw = {"model": tiny_kv_model_dir, "adapter": tiny_kv_adapter_dir, "kv_bits": bits, "max_sessions": 1}
    turns = openclaw_turns(4)
    engine = engine_factory(**kw)
    run(engine, job(turns[0], key="other"))  # puts the system prompt in the prefix cache
    for turn in turns[:2]:
        run(engine, job(turn, snippets=("the user keeps bees",)))
    run(engine, job(turns[0], key="other"))  # evicts s1 (max_sessions 1)
    assert session_of(engine).cache is None
    run(engine, job(turns[2]))  # rebuilt from disk, from the shared prefix
    # Where the sessions came from: both evicted ones (s1, then other) from the disk cache, checked.
    _assert_came_from(engine, disk_hits=2, replay_checks=2)
    asyncio.run(engine.close())
    restarted = engine_factory(**kw)
    last = run(restarted, job(turns[3], temperature=0.0))
    _assert_came_from(restarted, disk_hits=1, replay_checks=1, prefix_loads=1)  # the prefix read once, from disk

    # The same conversation on an engine of its own (its own state dir: nothing from the disk cache
    # above), never evicted nor restarted.
    fresh = engine_factory(**{**kw, "max_sessions": 16}, state="fresh")
    for turn in turns[:2]:
        run(fresh, job(turn, key="alone", snippets=("the user keeps bees",)))
    run(fresh, job(turns[2], key="alone"))
    reference = run(fresh, job(turns[3], key="alone", temperature=0.0))
    assert _answer(last) == _answer(reference)
    _assert_came_from(fresh, disk_hits=0, replay_checks=0)
    session = session_of(restarted)
    assert all(type(c).__name__ == "QuantizedDeltaKVCache" and c.bits == bits for c in session.cache)
    _assert_states_close(delta_states(restarted.model, session.cache), one_shot_states(restarted, session))
    alone = session_of(fresh, "alone")
    assert session.tokens == alone.tokens and session.snippet_writes == alone.snippet_writes
    _assert_states_close(delta_states(restarted.model, session.cache), delta_states(fresh.model, alone.cache))


def _assert_came_from(engine, disk_hits: int, replay_checks: int, prefix_loads: int = 0) -> None:
    """/health's account of where restored sessions came from: disk hits, nothing replayed from zero."""
    health = asyncio.run(engine.health())
    disk, sessions = health["disk_cache"], health["sessions"]
    assert (disk["hits"], disk["partial_hits"], disk["fallbacks"]) == (disk_hits, 0, 0), disk
    assert disk["prefix_loads"] == prefix_loads, disk
    assert (sessions["replay_checks"], sessions["replay_mismatches"]) == (replay_checks, 0), sessions


def test_openclaw_rollbacks_land_on_kept_states_and_prefill_only_new_tokens(engine_factory) -> None:
    engine = engine_factory()
    previous: list[int] = []
    for i, messages in enumerate(openclaw_turns(4)):
        prompt = render_prompt(engine.tokenizer, job(messages).messages, ())
        events = run(engine, job(messages))
        done = events[0]
        assert isinstance(done, PromptDone)
        if i > 0:  # the cut at the dropped internal-context message needs no replay
            assert done.cached_tokens == common_prefix(previous, prompt)
        previous = list(session_of(engine).tokens)
    session = session_of(engine)
    record = session.cache[0].record
    starts = message_starts(engine.tokenizer, session.tokens)
    # Kept: every 64th token, both sides of each `<|im_start|>`, where each answer started.
    assert len(record.starts) <= len(session.tokens) // DELTA_RECORD_INTERVAL + 2 * len(starts) + session.turns
    assert len(record.starts) < len(session.tokens) / 8
    _assert_states_close(delta_states(engine.model, session.cache), one_shot_states(engine, session))


def test_a_cut_inside_a_message_prefills_back_from_the_last_kept_state(engine_factory) -> None:
    engine = engine_factory()
    long_user = "please look at item number " + " ".join(str(i) for i in range(120))
    run(engine, job([("system", SYSTEM), ("user", long_user + " and tell me")]))
    edited = [("system", SYSTEM), ("user", long_user + " and then forget it")]
    before = list(session_of(engine).tokens)
    events = run(engine, job(edited))
    prompt = render_prompt(engine.tokenizer, job(edited).messages, ())
    common = common_prefix(before, prompt)
    assert common - DELTA_RECORD_INTERVAL < events[0].cached_tokens <= common
    session = session_of(engine)
    _assert_states_close(delta_states(engine.model, session.cache), one_shot_states(engine, session))


# ---- the budget ---------------------------------------------------------------------------------


def _budget_for(engine, sessions: float, read_back: bool = False) -> int:
    """Bytes for one shared prefix and `sessions` sessions of the openclaw_turns(1) size referencing it, as
    the memory guard counts them; `read_back`: and the step more one of them may hold once read back from disk."""
    layout = analyse_prompt(engine.tokenizer, render_prompt(engine.tokenizer, job(openclaw_turns(1)[0]).messages, ()))
    own = engine.guard.session_bytes(len(layout.tokens) + 8, layout.kept_states, shared=layout.boundary)
    step = engine.guard.step_bytes() if read_back else 0
    return int(engine.guard.session_bytes(layout.boundary) + sessions * own + step)


def test_sessions_are_evicted_before_a_prefill_would_exceed_the_budget(engine_factory, monkeypatch) -> None:
    probe = engine_factory()
    budget = _budget_for(probe, 1, read_back=True)
    engine = engine_factory(max_kv_bytes=budget)
    seen: list[int] = []
    original = engine.prefiller._run_segment

    def measured(*args: Any, **kwargs: Any) -> Iterator[None]:
        for step in original(*args, **kwargs):  # after every prefill step
            seen.append(_held(engine))
            yield step

    monkeypatch.setattr(engine.prefiller, "_run_segment", measured)
    for key in ("a", "b", "c"):
        assert _answer(run(engine, job(openclaw_turns(1)[0], key=key)))
        assert _held(engine) <= budget
    assert seen and max(seen) <= budget
    assert engine.store.evictions >= 2 and session_of(engine, "a").cache is None
    # An evicted session comes back from disk, exactly.
    run(engine, job(openclaw_turns(2)[1], key="a"))
    a = session_of(engine, "a")
    _assert_states_close(delta_states(engine.model, a.cache), one_shot_states(engine, a))


def test_a_request_that_cannot_fit_alone_is_refused_with_413_and_nothing_evicted(engine_factory) -> None:
    probe = engine_factory()
    engine = engine_factory(max_kv_bytes=_budget_for(probe, 0.6))
    assert _answer(run(engine, job([("user", "hi")], key="small")))
    events = run(engine, job(openclaw_turns(1)[0], key="big"))
    failure = events[-1]
    assert isinstance(failure, Failed) and failure.status == 413 and failure.code == "kv_budget_exceeded"
    assert "--max-kv-bytes" in failure.message and "KV budget" in failure.message
    assert session_of(engine, "small").cache is not None and engine.store.evictions == 0
    assert _answer(run(engine, job([("user", "hi again")], key="small")))


def test_concurrent_sessions_wait_for_kv_room_and_never_exceed_the_budget(engine_factory, monkeypatch) -> None:
    turns = openclaw_turns(3)
    probe = engine_factory()
    longest = render_prompt(probe.tokenizer, job(turns[-1]).messages, ())
    one = probe.guard.session_bytes(len(longest) + 8, 2 * len(message_starts(probe.tokenizer, longest)))
    budget = int(1.2 * (one + probe.guard.session_bytes(len(longest))))  # one session and its prefix, not two
    engine = engine_factory(max_kv_bytes=budget, state="bounded")
    seen: list[int] = []
    scheduler = engine._scheduler
    for name in ("_decode", "_prefill"):  # KV held after every step, as /health would report it
        step = getattr(scheduler, name)

        def measured(step: Any = step) -> None:
            step()
            seen.append(_held(engine))

        monkeypatch.setattr(scheduler, name, measured)

    async def together(messages: list[tuple[str, str]]) -> list[list[Any]]:
        async def collect(key: str) -> list[Any]:
            return [event async for event in engine.submit(job(messages, key=key))]

        return await asyncio.gather(*(collect(f"s{i}") for i in range(8)))

    for messages in turns:  # turns alternate: one session after another, then all eight at once
        for i in range(8):
            assert _answer(run(engine, job(messages, key=f"s{i}")))
        for events in asyncio.run(together(messages)):
            assert _answer(events)  # every job ran (none refused, none stuck)
    assert seen and max(seen) <= budget
    assert engine.counters.refused_for_memory == 0 and engine.counters.jobs == 2 * 8 * len(turns)


def test_mlx_memory_limit_lowers_the_budget(engine_factory, tiny_model_dir) -> None:
    gc.collect()  # earlier tests' engines (an engine and its scheduler refer to each other) hold MLX memory
    limit = mx.get_active_memory() + model_weight_bytes(tiny_model_dir) + WORKING_BYTES + 2 * MIB
    previous = mx.set_memory_limit(limit)
    try:
        engine = engine_factory()
        health = asyncio.run(engine.health())
    finally:
        mx.set_memory_limit(previous)
    # The limit leaves 2 MiB beside the weights and one step's working memory (less what MLX held since).
    assert 1 * MIB < health["memory"]["kv_budget_bytes"] <= 2 * MIB < engine.settings.max_kv_bytes
    big = [("system", SYSTEM * 8), ("user", "hi")]
    assert run(engine, job(big))[-1].status == 413
    assert _answer(run(engine, job([("user", "hi")], key="small")))


class _FailingAttention:
    """Stands in for one layer's attention and fails like MLX does when an allocation fails."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.armed = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.armed:
            self.armed = False
            raise RuntimeError("[metal::malloc] Attempting to allocate 8589934592 bytes, more than the buffer limit")
        return self.inner(*args, **kwargs)


def test_a_failed_allocation_fails_one_request_and_leaves_the_engine_healthy(engine_factory) -> None:
    engine = engine_factory()
    turns = openclaw_turns(3)
    run(engine, job(turns[0], snippets=("the user keeps bees",)))
    # Turn 0's chunks for the disk cache (the shared prefix's, then the session's) are encoded on another
    # thread, whose MLX views are freed (into MLX's buffer cache) when it is done: wait for the session's
    # (queued last), so that only the failing turn allocates.
    asyncio.run(engine.save_session(hash_session_key("s1")))
    failing = _FailingAttention(engine.model.layers[1].self_attn)
    engine.model.layers[1].self_attn = failing
    failing.armed = True  # layer 0 has written its cache when layer 1 fails: a half-written cache
    events = run(engine, job(turns[1]))
    failure = events[-1]
    assert isinstance(failure, Failed) and failure.status == 503 and failure.code == "out_of_memory"
    assert session_of(engine).cache is None and mx.get_cache_memory() == 0
    health = asyncio.run(engine.health())
    assert health["jobs"]["allocation_failures"] == 1

    retried = run(engine, job(turns[1], temperature=0.0))
    reference = engine_factory()
    run(reference, job(turns[0], snippets=("the user keeps bees",)))
    assert _answer(retried) == _answer(run(reference, job(turns[1], temperature=0.0)))
    session = session_of(engine)
    _assert_states_close(delta_states(engine.model, session.cache), one_shot_states(engine, session))


def test_health_reports_kv_per_session_shared_prefix_and_delta_record(
    engine_factory, tiny_kv_model_dir, tiny_kv_adapter_dir
) -> None:
    engine = engine_factory(model=tiny_kv_model_dir, adapter=tiny_kv_adapter_dir, kv_bits=4)
    for key in ("a", "b"):
        run(engine, job(openclaw_turns(1)[0], key=key))
    health = asyncio.run(engine.health())
    memory = health["memory"]
    assert memory["kv_bits"] == "4" and memory["kv_group_size"] == 64
    assert {s["session"] for s in memory["sessions"]} == {session_of(engine, k).key_hash[:12] for k in "ab"}
    # Each figure against what the caches must hold: 4-bit K/V for the tokens after the shared prefix
    # each session references (its own) in whole 256-token steps, plus δ records; the prefix once.
    per_token = kv_bytes_per_token(KvShape.from_dirs(tiny_kv_model_dir, tiny_kv_adapter_dir), 4, 64)
    prefix_tokens = health["prefix_cache"]["tokens"]
    for s in memory["sessions"]:
        session = session_of(engine, "a" if s["session"] == session_of(engine, "a").key_hash[:12] else "b")
        assert s["tokens"] == len(session.tokens) == session.cache[0].offset
        assert s["shared_prefix_tokens"] == prefix_tokens > 0
        slots = (s["kv_bytes"] - s["delta_record_bytes"]) / per_token
        assert slots == cache_tokens(s["tokens"] - prefix_tokens)
    [prefix] = memory["shared_prefixes"]
    assert prefix == {"tokens": prefix_tokens, "bytes": memory["shared_prefix_bytes"], "sessions": 2, "listed": True}
    assert memory["shared_prefix_bytes"] >= cache_tokens(prefix_tokens) * per_token
    assert memory["kv_bytes"] == sum(s["kv_bytes"] for s in memory["sessions"]) + memory["shared_prefix_bytes"]
    assert 0 < memory["delta_record_bytes"] < memory["kv_bytes"]
    assert all(0 < s["delta_record_bytes"] < s["kv_bytes"] for s in memory["sessions"])


def test_a_failed_allocation_in_a_batched_decode_step_fails_its_rows_and_leaves_the_engine_healthy(
    engine_factory, monkeypatch
) -> None:
    engine = engine_factory()
    real_step, real_render = decoding.decode_rows, prompts.render_prompt
    rendered, renders = threading.Condition(), [0]

    def render(tokenizer: Any, messages: Any, tools: Any) -> list[int]:
        prompt = real_render(tokenizer, messages, tools)
        with rendered:
            renders[0] += 1
            rendered.notify_all()
        return prompt

    def failing_when_batched(model: Any, tokens: mx.array, caches: list[Any], delta: list[bool]) -> mx.array:
        if len(caches) > 1:
            raise RuntimeError("[metal::malloc] Attempting to allocate 8589934592 bytes, more than the buffer limit")
        with rendered:  # the first row waits for both prompts: the second joins it, however the threads run
            assert rendered.wait_for(lambda: renders[0] >= 2, timeout=60)
        return real_step(model, tokens, caches, delta)

    # The module-level functions the engine renders and decodes with.
    patch_function(monkeypatch, prompts, "render_prompt", render)
    patch_function(monkeypatch, decoding, "decode_rows", failing_when_batched)

    async def events(key: str) -> list[Any]:
        return [event async for event in engine.submit(job([("user", f"row {key}")], key=key, max_tokens=32))]

    async def together() -> list[list[Any]]:
        return await asyncio.gather(events("a"), events("b"))

    for events in asyncio.run(together()):
        failure = events[-1]
        assert isinstance(failure, Failed) and failure.status == 503 and failure.code == "out_of_memory"
    assert session_of(engine, "a").cache is None and session_of(engine, "b").cache is None
    assert asyncio.run(engine.health())["jobs"]["allocation_failures"] == 1
    assert _answer(run(engine, job([("user", "row a")], key="a", max_tokens=4)))
