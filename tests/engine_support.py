"""Helpers for engine tests: an engine factory fixture on the tiny model, jobs, sessions, references."""

from __future__ import annotations

import asyncio
import sys
import threading
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest

from common.settings import SidecarSettings
from sidecar.delta.api import delta_states, make_cache, write_context
from sidecar.engine import decoding, prompts
from sidecar.engine.engine import Engine, load_engine
from sidecar.engine.interface import ChatJob, ChatMessage
from sidecar.sessions.keys import hash_session_key

SYSTEM = "You are a careful assistant with tools. " * 30


def settings_for(model_dir: Path, adapter_dir: Path | None, state_dir: Path, **overrides: Any) -> SidecarSettings:
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

    def make(
        adapter: Path | None = tiny_adapter_dir, model: Path = tiny_model_dir, state: str = "state", **overrides: Any
    ) -> Engine:
        # Engines made with the same `state` share their state dir, as a restarted server does.
        engine = load_engine(settings_for(model, adapter, tmp_path / state, **overrides))
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        asyncio.run(engine.close())


def job(messages: list[tuple[str, str]], key: str = "s1", **kw: Any) -> ChatJob:
    kw.setdefault("max_tokens", 8)
    return ChatJob(key_hash=hash_session_key(key), messages=tuple(ChatMessage(r, c) for r, c in messages), **kw)  # type: ignore[arg-type]


def run(engine: Engine, job: ChatJob) -> list[Any]:
    async def collect() -> list[Any]:
        return [event async for event in engine.submit(job)]

    return asyncio.run(collect())


def openclaw_turns(n: int) -> list[list[tuple[str, str]]]:
    """n request histories shaped like OpenClaw's: each ends with an internal-context message that the next drops."""
    turns, history = [], [("system", SYSTEM)]
    for i in range(n):
        history = history + [("user", f"question number {i}: what about item {i * 7}?")]
        turns.append(history + [("user", f"[internal context for turn {i}] recalled notes {i}")])
        history = history + [("assistant", f"answer {i}")]
    return turns


def session_of(engine: Engine, key: str = "s1", delta: bool = True):
    return engine.store.peek(hash_session_key(key), delta)


def one_shot_states(engine: Engine, session) -> list[mx.array]:
    """The δ-states from a single fresh pass over the session's final tokens, memory writes at their offsets."""
    cache = make_cache(engine.model, engine.settings.kv_bits, engine.settings.kv_group_size)
    done = 0
    for context in session.snippet_writes:
        if context.offset > done:
            engine.model(mx.array([session.tokens[done : context.offset]]), cache=cache)
            done = context.offset
        write_context(engine.model, cache, list(context.tokens))
    engine.model(mx.array([session.tokens[done:]]), cache=cache)
    return delta_states(engine.model, cache)


def patch_function(patch: pytest.MonkeyPatch, module: Any, name: str, replacement: Any) -> None:
    """Replace a module-level function (or constant) of the sidecar in its module and in every sidecar
    module that imported it by name, so that a hook still fires when engine code moves between modules."""
    original = getattr(module, name)
    for loaded in list(sys.modules.values()):
        if getattr(loaded, "__name__", "").startswith("sidecar.") and getattr(loaded, name, None) is original:
            patch.setattr(loaded, name, replacement)


def hold_until_late_renders(patch: pytest.MonkeyPatch, streams: dict[str, Any], running: str) -> None:
    """Once the row of `streams[running]` has 3 tokens, decode steps wait until a prompt whose message
    starts with "late:" is rendered, so that late joins while that row decodes however the threads run
    (hooks decoding.step and prompts.render_prompt)."""
    rendered = threading.Event()
    real_render, real_step = prompts.render_prompt, decoding.step

    def render(tokenizer: Any, messages: Any, tools: Any) -> list[int]:
        prompt = real_render(tokenizer, messages, tools)
        if any(m.content.startswith("late:") for m in messages):
            rendered.set()
        return prompt

    def step(model: Any, rows: list[Any]) -> Any:
        if any(row.stream is streams.get(running) and row.generated >= 3 for row in rows):
            assert rendered.wait(60), "late's prompt was never rendered"
        return real_step(model, rows)

    patch_function(patch, prompts, "render_prompt", render)
    patch_function(patch, decoding, "step", step)
