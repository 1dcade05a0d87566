"""What each step of the real engine does: a chunk of prefill between two decode steps, quantized
prefill steps whose attention scores stay bounded, and the memory guard before every batched step.

The engine is built on a model wrapper that logs every call of the model's forward (Engine takes the
model it runs as an argument), so these tests see the steps without reaching into the engine.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx_lm
import pytest
from engine_support import SYSTEM, job, patch_function, settings_for

from common.kv_budget import KvShape, session_bytes
from sidecar.delta.api import attach_delta_mem
from sidecar.engine import decoding
from sidecar.engine.engine import Engine
from sidecar.engine.interface import ChatJob, Finished, PromptDone, TextDelta
from sidecar.sessions.keys import hash_session_key

CHUNK = 32


class ForwardLog:
    """A model that logs (cache, tokens, cached tokens before the call) for every forward call."""

    def __init__(self, model: Any) -> None:
        self.model_ = model
        self.calls: list[tuple[int, int, int]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model_, name)

    def __call__(self, inputs: mx.array, cache: Any = None, **kwargs: Any) -> mx.array:
        self.calls.append((id(cache), inputs.shape[1], cache[0].offset if cache else 0))
        return self.model_(inputs, cache=cache, **kwargs)


@pytest.fixture
def logged_engine(tiny_model_dir: Path, tiny_adapter_dir: Path, tmp_path: Path):
    engines: list[Engine] = []

    def make(model_dir: Path = tiny_model_dir, adapter_dir: Path = tiny_adapter_dir, **overrides: Any) -> Engine:
        settings = settings_for(model_dir, adapter_dir, tmp_path / f"state{len(engines)}", **overrides)
        model, tokenizer = mlx_lm.load(settings.model_path)
        if adapter_dir is not None:
            attach_delta_mem(model, str(adapter_dir))
        engine = Engine(ForwardLog(model), tokenizer, settings)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        asyncio.run(engine.close())


async def _events(
    engine: Engine,
    request: ChatJob,
    log: list[tuple[str, Any]],
    decoding_now: asyncio.Event | None = None,
    until: asyncio.Event | None = None,
) -> list[Any]:
    """Run a job, logging its events; set `decoding_now` at its first token, cancel it once `until` is set."""
    stream = engine.submit(request)
    events = []
    async for event in stream:
        events.append(event)
        log.append((request.key_hash, event))
        if decoding_now is not None and isinstance(event, TextDelta):
            decoding_now.set()
        if until is not None and until.is_set():
            stream.cancel()
    return events


def test_a_long_prompt_prefills_one_chunk_per_step_beside_a_decoding_row(logged_engine) -> None:
    engine = logged_engine(prefill_chunk=CHUNK)
    model: ForwardLog = engine.model
    model.calls.clear()  # the disk cache's one-token probe of the cache layout, at start-up
    log: list[tuple[str, Any]] = []

    async def scenario() -> None:
        a_decoding, long_done = asyncio.Event(), asyncio.Event()
        decoding_row = asyncio.create_task(
            _events(engine, job([("user", "row a")], key="a", max_tokens=3000), log, a_decoding, long_done)
        )
        await a_decoding.wait()
        await _events(engine, job([("system", SYSTEM), ("user", "a long prompt " * 20)], key="b", max_tokens=2), log)
        long_done.set()
        await decoding_row

    asyncio.run(scenario())
    a_cache = model.calls[0][0]  # a's prompt came first
    b_calls = [i for i, (cache, tokens, _) in enumerate(model.calls) if cache != a_cache]
    assert isinstance(log[-1][1], Finished) and log[-1][1].finish_reason == "cancelled"
    assert log[-1][0] == hash_session_key("a")
    assert len(b_calls) >= 8 and all(model.calls[i][1] <= CHUNK for i in b_calls)
    # Between two of b's prefill calls, a got its next token: one chunk per step, never a whole prefill.
    for first, second in zip(b_calls, b_calls[1:]):
        assert any(model.calls[i][0] == a_cache for i in range(first + 1, second)), (first, second)


def test_a_quantized_prefill_runs_in_prefill_chunk_steps_like_a_float_one(
    logged_engine, tiny_kv_model_dir: Path, tiny_kv_adapter_dir: Path
) -> None:
    # Its attention is the float attention over the dequantized K/V (sidecar/delta/attention.py), so
    # a long prompt over an 8-bit cache is prefilled one --prefill-chunk per step, as over a float one.
    engine = logged_engine(tiny_kv_model_dir, tiny_kv_adapter_dir, kv_bits=8, prefill_chunk=CHUNK)
    model: ForwardLog = engine.model
    events = asyncio.run(_collect(engine, job([("system", SYSTEM), ("user", "item " * 120)], max_tokens=1)))
    prompt_tokens = events[0].prompt_tokens
    assert isinstance(events[0], PromptDone) and prompt_tokens > 8 * CHUNK
    prefill = [tokens for _, tokens, _ in model.calls if tokens > 1]
    assert sum(prefill) == prompt_tokens - 1
    assert max(prefill) == CHUNK and len(prefill) <= (prompt_tokens - 1) // CHUNK + 3  # a chunk per step


async def _collect(engine: Engine, request: ChatJob) -> list[Any]:
    return [event async for event in engine.submit(request)]


def test_rows_growing_together_in_one_batch_stay_within_the_budget(
    logged_engine, tiny_model_dir: Path, tiny_adapter_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two rows decode together and each crosses a 256-token cache step; an idle session c would fit
    beside their caches as they start, not beside them grown. Each row's room (its whole answer) is
    reserved when it is admitted, so c gives way before the rows grow, and the KV held after every
    batched step stays within the budget."""
    shape = KvShape.from_dirs(tiny_model_dir, tiny_adapter_dir)
    answer = 300  # both rows cross one 256-token cache step while they decode
    one_step, two_steps = session_bytes(shape, 200, messages=4), session_bytes(shape, 400, messages=4)
    # a and b grown fit together; beside c they do not (c holds one cache step).
    budget = 2 * two_steps + one_step // 2
    engine = logged_engine(max_kv_bytes=budget)
    held: list[int] = []
    real_step = decoding.step

    def measured(model: Any, rows: list[Any]) -> Any:
        ended = real_step(model, rows)
        if len(rows) > 1:
            health = asyncio.run(engine.health())
            held.append(health["memory"]["kv_bytes"])
        return ended

    patch_function(monkeypatch, decoding, "step", measured)
    run_events = asyncio.run(_collect(engine, job([("user", "idle c")], key="c", max_tokens=4)))
    assert isinstance(run_events[-1], Finished)
    log: list[tuple[str, Any]] = []

    async def together() -> list[list[Any]]:
        requests = [job([("user", f"row {key}")], key=key, max_tokens=answer) for key in "ab"]
        return await asyncio.gather(*(_events(engine, r, log) for r in requests))

    for events in asyncio.run(together()):
        assert events[-1] == Finished("length", answer)
    health = asyncio.run(engine.health())
    # The rows shared steps long enough to grow past their first cache step together.
    assert len(held) > 256 - 20
    assert max(held) <= budget == health["memory"]["kv_budget_bytes"]
    assert health["sessions"]["evictions"] == 1 and health["sessions"]["with_kv"] == 2
