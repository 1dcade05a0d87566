"""Through the engine: sessions that reference the shared system prompt's K/V answer as with a private
copy, and memory counts the prefix once.

Exactness: one scenario runs on an engine with `share_prefix` on and on one with it off (each with its
own state dir), for the TSW, SSW and MSW adapters on a model with tied embeddings (as Qwen3-4B),
float and 8-bit K/V. A first engine answers two sessions and stops; a restarted one then answers six
sessions together: one restored from disk, a new one on the shared prefix writing hidden memory, one
rolling back into the system prompt (a private copy, then the edited prompt's own shared prefix: a
row on another prefix), one with δ off (the base mode's prefix), one without a system prompt (a
private cache) and one joining while the others decode. Every session must end with the same tokens
and texts and δ-states within 1e-6 (8-bit: 1e-5, see below) on both engines, and the engine with
sharing must really have shared (/health says which sessions reference a prefix).

Memory: eight sessions on one prefix are counted as the prefix once plus their own tokens; a budget
that holds them sharing evicts nothing (copying the prefix it must); evicting sessions leaves the
prefix while one references it, and the prefix goes once none does.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from engine_support import SYSTEM, hold_until_late_renders, job, run, session_of

from sidecar.delta.api import delta_states
from sidecar.engine.engine import Engine
from sidecar.engine.interface import ChatJob, Finished, PromptDone, TextDelta
from sidecar.engine.prompt_layout import analyse_prompt
from sidecar.engine.prompts import render_prompt
from sidecar.engine.scheduler import JobChannel

# δ-states of a session on the shared prefix against its private copy: float K/V within 1e-6; with
# 8-bit K/V the two segments' last-bit differences can flip the rounding of a later token's
# quantized K/V, so states drift within 1e-5 (as tests/test_shared_prefix.py measures per layer).
STATE_ATOL = {None: 1e-6, 8: 1e-5}
ADAPTERS = ("tiny_tied_adapter_dir", "tiny_tied_ssw_adapter_dir", "tiny_tied_msw_adapter_dir")
CHUNK = 32
# An edit inside the system prompt: the first part is kept, the rest differs.
EDITED_SYSTEM = SYSTEM[: len(SYSTEM) // 2] + "You answer in French. " * 10


def _chat(user: str, system: str | None = SYSTEM) -> list[tuple[str, str]]:
    return ([("system", system)] if system is not None else []) + [("user", user)]


def _first_phase() -> dict[str, list[ChatJob]]:
    """What the first engine answers before it stops (the restarted engine restores these from disk)."""
    return {"restored": [job(_chat("restored: what was on the list?"), "restored", max_tokens=6)]}


def _batch() -> dict[str, list[ChatJob]]:
    """Each session's requests on the restarted engine, all sessions at once."""
    restored = [*_chat("restored: what was on the list?"), ("assistant", "the list"), ("user", "and then?")]
    return {
        "restored": [job(restored, "restored", max_tokens=12)],
        "shared": [job(_chat("shared: tell me about the blue door"), "shared", max_tokens=40,
                       snippets=("the door is blue", "it was painted in May"))],
        "private": [job(_chat("private: a first question"), "private", max_tokens=4),
                    job(_chat("private: now in French", EDITED_SYSTEM), "private", max_tokens=10)],
        "base": [job(_chat("base: no memory here"), "base", max_tokens=16, delta_enabled=False)],
        "none": [job(_chat("none: no system prompt at all", None), "none", max_tokens=16)],
        "late": [job(_chat("late: joining while the others decode"), "late", max_tokens=10)],
    }  # fmt: skip


async def _together(engine: Engine, plan: dict[str, list[ChatJob]]) -> dict[str, list[list[Any]]]:
    shared_is_decoding = asyncio.Event()
    streams: dict[str, JobChannel] = {}

    async def session(name: str) -> list[list[Any]]:
        if name == "late":
            await shared_is_decoding.wait()
        turns = []
        for request in plan[name]:
            stream = engine.submit(request)
            streams[name] = stream
            events = []
            async for event in stream:
                events.append(event)
                if name == "shared" and isinstance(event, PromptDone):
                    shared_is_decoding.set()
            turns.append(events)
        return turns

    with pytest.MonkeyPatch.context() as patch:
        hold_until_late_renders(patch, streams, "shared")
        results = await asyncio.gather(*(session(name) for name in plan))
    return dict(zip(plan, results))


def _run_scenario(engine_factory: Any, dirs: dict[str, Any], share: bool) -> tuple[Engine, dict[str, Any]]:
    state = "shared" if share else "copied"
    first = engine_factory(**dirs, share_prefix=share, state=state, prefill_chunk=CHUNK)
    for requests in _first_phase().values():
        for request in requests:
            assert isinstance(run(first, request)[-1], Finished)
    asyncio.run(first.close())
    engine = engine_factory(**dirs, share_prefix=share, state=state, prefill_chunk=CHUNK)
    return engine, asyncio.run(_together(engine, _batch()))


def _text(events: list[Any]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


def _sessions(engine: Engine) -> dict[str, Any]:
    """The final session of each name in the batch (δ off for `base`)."""
    return {name: session_of(engine, name, delta=name != "base") for name in _batch()}


@pytest.mark.parametrize("bits", [None, 8])
@pytest.mark.parametrize("adapter", ADAPTERS)
def test_sessions_on_the_shared_prefix_answer_as_with_a_private_copy_in_a_mixed_batch(
    engine_factory, request: pytest.FixtureRequest, tiny_tied_model_dir: Path, adapter: str, bits: int | None
) -> None:
    dirs = {"model": tiny_tied_model_dir, "adapter": request.getfixturevalue(adapter), "kv_bits": bits}
    sharing, shared_results = _run_scenario(engine_factory, dirs, share=True)
    copying, copied_results = _run_scenario(engine_factory, dirs, share=False)

    shared_sessions, copied_sessions = _sessions(sharing), _sessions(copying)
    for name, turns in shared_results.items():
        for i, (a, b) in enumerate(zip(turns, copied_results[name], strict=True)):
            where = f"{name} turn {i + 1}"
            assert isinstance(a[-1], Finished) and a[-1] == b[-1], where
            assert _text(a) == _text(b), where
        a, b = shared_sessions[name], copied_sessions[name]
        assert a.tokens == b.tokens and a.snippet_writes == b.snippet_writes, name
        for layer, (x, y) in enumerate(zip(delta_states(sharing.model, a.cache), delta_states(copying.model, b.cache),
                                           strict=True)):  # fmt: skip
            np.testing.assert_allclose(np.array(x), np.array(y), atol=STATE_ATOL[bits], rtol=1e-6,
                                       err_msg=f"{name}, layer {layer}")  # fmt: skip

    # What the scenario claims happened did happen: who referenced a prefix, where each came from.
    health = asyncio.run(sharing.health())
    referencing = {s["session"]: s["shared_prefix_tokens"] for s in health["memory"]["sessions"]}
    prefix = {name: referencing[s.key_hash[:12]] for name, s in shared_sessions.items()}
    boundary = prefix["shared"]
    assert boundary > 0 and prefix == {**prefix, "restored": boundary, "late": boundary, "none": 0}
    assert 0 < prefix["private"] < boundary  # it decoded on the edited prompt's own prefix: another one
    assert prefix["base"] > 0  # δ off: the base mode's own prefix
    copied_health = asyncio.run(copying.health())
    assert all(s["shared_prefix_tokens"] == 0 for s in copied_health["memory"]["sessions"])
    assert copied_health["memory"]["shared_prefixes"] and not any(
        p["sessions"] for p in copied_health["memory"]["shared_prefixes"]
    )
    for engine_health in (health, copied_health):
        disk = engine_health["disk_cache"]
        assert disk["hits"] + disk["partial_hits"] >= 1, disk  # `restored` came from disk
        assert engine_health["batch"]["mean_occupancy"] > 1.5
    # The private row rolled back into the system prompt (its second turn reused less than the prefix).
    second = shared_results["private"][1][0]
    assert isinstance(second, PromptDone) and 0 < second.cached_tokens < boundary


# ---- memory: the prefix counted once ----------------------------------------------------------------


def _eight(engine: Engine, key: str = "s") -> None:
    """Eight one-turn sessions on the same system prompt, one after another."""
    for i in range(8):
        events = run(engine, job(_chat(f"question {i}: what about item {i * 7}?"), f"{key}{i}"))
        assert isinstance(events[-1], Finished)


def _budget_for_eight_sharing(engine: Engine) -> tuple[int, int, int]:
    """A budget that holds the system prompt once and eight one-turn sessions beside it (with 20 % to
    spare), the prefix's tokens and one session's own bytes."""
    prompt = render_prompt(engine.tokenizer, job(_chat("question 0: what about item 0?")).messages, ())
    layout = analyse_prompt(engine.tokenizer, prompt)
    own = engine.guard.session_bytes(len(prompt) + 8, layout.kept_states, shared=layout.boundary)
    return int(1.2 * (engine.guard.session_bytes(layout.boundary) + 8 * own)), layout.boundary, own


def test_eight_sessions_on_one_prefix_count_it_once(engine_factory, tiny_tied_model_dir, tiny_tied_adapter_dir) -> None:
    probe = engine_factory(tiny_tied_adapter_dir, tiny_tied_model_dir)
    budget, boundary, own = _budget_for_eight_sharing(probe)
    engine = engine_factory(tiny_tied_adapter_dir, tiny_tied_model_dir, max_kv_bytes=budget, state="bounded")
    _eight(engine)
    memory = asyncio.run(engine.health())["memory"]
    assert engine.store.evictions == 0 and len(memory["sessions"]) == 8
    [prefix] = memory["shared_prefixes"]
    assert (prefix["tokens"], prefix["sessions"], prefix["listed"]) == (boundary, 8, True)
    assert memory["shared_prefix_bytes"] == prefix["bytes"] == engine.prefixes.shared_prefix(
        next(key for key, _ in engine.prefixes.entries())
    ).nbytes
    own_bytes = [s["kv_bytes"] for s in memory["sessions"]]
    assert memory["kv_bytes"] == prefix["bytes"] + sum(own_bytes) <= budget
    # Each session holds its own tokens only: nothing like a copy of the prefix (issue 23: resident KV
    # for 8 sessions ≤ one prefix + 8 × their own tokens, + 5 %).
    assert memory["kv_bytes"] <= 1.05 * (engine.guard.session_bytes(boundary) + 8 * own)
    assert all(s["shared_prefix_tokens"] == boundary for s in memory["sessions"])
    assert max(own_bytes) < prefix["bytes"]

    # Copying the prefix, the same budget cannot hold them: sessions were evicted.
    copying = engine_factory(tiny_tied_adapter_dir, tiny_tied_model_dir, max_kv_bytes=budget, share_prefix=False,
                             state="copying")  # fmt: skip
    _eight(copying)
    assert copying.store.evictions > 0


def _make_room(engine: Engine, needed: int) -> None:
    """Ask the memory keeper for `needed` bytes, on the generation thread (between two steps)."""

    async def call() -> None:
        await engine._scheduler.call(lambda: engine.memory.make_room(needed))

    asyncio.run(call())


def test_evicting_sessions_leaves_the_prefix_while_one_references_it(
    engine_factory, tiny_tied_model_dir, tiny_tied_adapter_dir
) -> None:
    engine = engine_factory(tiny_tied_adapter_dir, tiny_tied_model_dir)
    _eight(engine)
    before = asyncio.run(engine.health())["memory"]
    [prefix] = before["shared_prefixes"]
    own = {s["session"]: s["kv_bytes"] for s in before["sessions"]}
    # Room for all but the newest session's own bytes: the seven oldest go, the prefix they shared stays.
    newest = session_of(engine, "s7").key_hash[:12]
    budget = engine.guard.budget
    _make_room(engine, budget - prefix["bytes"] - own[newest])
    after = asyncio.run(engine.health())["memory"]
    assert [s["session"] for s in after["sessions"]] == [newest] and engine.store.evictions == 7
    assert after["shared_prefixes"] == [{**prefix, "sessions": 1}]
    assert after["kv_bytes"] == before["kv_bytes"] - sum(own.values()) + own[newest]

    # The prefix cache lets it go: the session still references it, so it is still held, counted once.
    key = next(key for key, _ in engine.prefixes.entries())
    engine.prefixes.evict(key)
    delisted = asyncio.run(engine.health())["memory"]
    assert delisted["shared_prefixes"] == [{**prefix, "sessions": 1, "listed": False}]
    assert delisted["kv_bytes"] == after["kv_bytes"]

    # Once no session references it, it goes with the last one.
    _make_room(engine, budget)
    empty = asyncio.run(engine.health())["memory"]
    assert empty["sessions"] == [] and empty["shared_prefixes"] == [] and empty["kv_bytes"] == 0


def test_a_listed_prefix_goes_only_once_no_session_references_it(
    engine_factory, tiny_tied_model_dir, tiny_tied_adapter_dir
) -> None:
    engine = engine_factory(tiny_tied_adapter_dir, tiny_tied_model_dir)
    _eight(engine)
    [prefix] = asyncio.run(engine.health())["memory"]["shared_prefixes"]
    # Asking for everything: every idle session goes first, then the entry, now unreferenced.
    _make_room(engine, engine.guard.budget - prefix["bytes"] // 2)
    memory = asyncio.run(engine.health())["memory"]
    assert memory["sessions"] == [] and memory["shared_prefixes"] == [] and engine.store.evictions == 8
    # New sessions take the prompt's prefix again (read back from disk), counted once.
    _eight(engine, key="t")
    [again] = asyncio.run(engine.health())["memory"]["shared_prefixes"]
    assert (again["tokens"], again["sessions"], again["listed"]) == (prefix["tokens"], 8, True)


def test_the_prefix_cache_count_bound_keeps_the_prefixes_sessions_reference(
    engine_factory, tiny_tied_model_dir, tiny_tied_adapter_dir
) -> None:
    engine = engine_factory(tiny_tied_adapter_dir, tiny_tied_model_dir)
    engine.prefixes.max_entries = 1
    run(engine, job(_chat("first"), "a"))
    run(engine, job(_chat("second", EDITED_SYSTEM), "b"))
    # Over the bound: both stay, each referenced by a resident session (dropping one would free nothing,
    # and the next session on that prompt would build a second copy).
    assert [p["sessions"] for p in asyncio.run(engine.health())["memory"]["shared_prefixes"]] == [1, 1]
    assert len(engine.prefixes.entries()) == 2
    _make_room(engine, engine.guard.budget)  # evicts the sessions and, unreferenced now, their prefixes
    run(engine, job(_chat("third", "A third system prompt. " * 40), "c"))
    assert len(engine.prefixes.entries()) == 1
