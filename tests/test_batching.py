"""Sessions answering together get exactly what each gets alone: batched decoding, row by row.

For the TSW, SSW and MSW adapters, five sessions run through one engine at once, prompts prefilled
in 32-token steps between decode steps: one answers at length and writes hidden memory; one
finishes early and sends its next turn (rolling back OpenClaw's dropped context message, with new
memory) while the others decode; one runs with δ off; one is cancelled mid-stream and sends its
request again; one joins while the others are decoding. Then each session's requests run alone, one
session at a time, on a fresh engine. After every turn each session's token history must be the
same, its δ-state (read from its session file) equal within 1e-4 and its answer the same text.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from engine_support import SYSTEM, hold_until_late_renders, job
from mlx_lm.models.cache import QuantizedKVCache

from sidecar.engine.engine import Engine
from sidecar.engine.interface import ChatJob, Finished, PromptDone, TextDelta
from sidecar.engine.scheduler import JobChannel

TOLERANCE = 1e-4
CHUNK = 32
UNCHUNKED = 4096  # the context window: a prompt in one call
MODELS = (
    ("tiny_model_dir", "tiny_adapter_dir"),
    ("tiny_model_dir", "tiny_ssw_adapter_dir"),
    ("tiny_model_dir", "tiny_msw_adapter_dir"),
    ("tiny_tied_model_dir", "tiny_tied_adapter_dir"),  # embeddings tied, as Qwen3-4B's
)


@dataclass
class TurnResult:
    text: str
    events: list[Any]
    tokens: np.ndarray
    states: list[np.ndarray]


def _plan(prefix: str) -> dict[str, list[ChatJob]]:
    """Each session's requests, in order (keys prefixed, so that two engines can share a state dir)."""

    def chat(user: str) -> list[tuple[str, str]]:
        return [("system", SYSTEM), ("user", user)]

    early_first = [("system", SYSTEM), ("user", "early: what is on the list?"), ("user", "[internal context 0]")]
    # OpenClaw's next request drops the internal-context message and adds the answer.
    early_second = [*early_first[:2], ("assistant", "the list"), ("user", "and then?"), ("user", "[context 1]")]
    return {
        "long": [job(chat("long: tell me everything about the blue door"), f"{prefix}long", max_tokens=64,
                     snippets=("the door is blue", "it was painted in May"))],
        "early": [job(early_first, f"{prefix}early", max_tokens=3),
                  job(early_second, f"{prefix}early", max_tokens=6, snippets=("early likes tea",))],
        "base": [job(chat("base: a question without memory"), f"{prefix}base", max_tokens=40, delta_enabled=False)],
        "cancelled": [job(chat("cancelled: a long story please"), f"{prefix}cancelled", max_tokens=24)],
        "late": [job(chat("late: joining while the others decode"), f"{prefix}late", max_tokens=16)],
    }  # fmt: skip


def _snapshot(engine: Engine, request: ChatJob, events: list[Any]) -> TurnResult:
    """The session's history and δ-states as saved when the turn finished."""
    mode = "delta" if request.delta_enabled else "base"
    path = Path(engine.settings.state_dir) / f"{request.key_hash}.{mode}.session.npz"
    with np.load(path, allow_pickle=False) as data:
        layers = sorted((n for n in data.files if n.startswith("state_")), key=lambda n: int(n[6:]))
        tokens, states = data["tokens"], [data[n] for n in layers]
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    return TurnResult(text, events, tokens, states)


async def _together(engine: Engine, plan: dict[str, list[ChatJob]], log: list[tuple[str, Any]]) -> dict[str, Any]:
    long_is_decoding = asyncio.Event()  # late comes then; the decode steps wait for it (see hold_until_late_renders)
    streams: dict[str, JobChannel] = {}

    async def turn(name: str, request: ChatJob, leave_after: int | None = None) -> list[Any]:
        events, stream = [], engine.submit(request)
        streams[name] = stream
        async for event in stream:
            events.append(event)
            log.append((name, event))
            deltas = sum(isinstance(e, TextDelta) for e in events)
            if name == "long" and isinstance(event, PromptDone):
                long_is_decoding.set()
            if leave_after is not None and deltas == leave_after:
                stream.cancel()
        return events

    async def session(name: str) -> list[TurnResult]:
        if name == "late":
            await long_is_decoding.wait()
        results = []
        for request in plan[name]:
            if name == "cancelled":
                cancelled = await turn("cancelled-first-attempt", request, leave_after=2)
                assert cancelled[-1] == Finished("cancelled", cancelled[-1].completion_tokens)
                assert cancelled[-1].completion_tokens < request.max_tokens
            events = await turn(name, request)
            results.append(_snapshot(engine, request, events))
        return results

    names = list(plan)
    with pytest.MonkeyPatch.context() as patch:
        hold_until_late_renders(patch, streams, "long")
        results = await asyncio.gather(*(session(name) for name in names))
    health = await engine.health()
    await engine.close()
    return {"results": dict(zip(names, results)), "health": health}


async def _alone(engine: Engine, plan: dict[str, list[ChatJob]]) -> dict[str, list[TurnResult]]:
    results: dict[str, list[TurnResult]] = {}
    for name, requests in plan.items():
        results[name] = []
        for request in requests:
            events = [event async for event in engine.submit(request)]
            results[name].append(_snapshot(engine, request, events))
    await engine.close()
    return results


def _index(log: list[tuple[str, Any]], name: str, kind: type, nth: int = 1) -> int:
    """Where the nth event of a kind from a session sits in the shared log (nth 0: the last)."""
    found = [i for i, (who, event) in enumerate(log) if who == name and isinstance(event, kind)]
    return found[nth - 1]


def _assert_equal_to_solo(together: dict[str, Any], alone: dict[str, list[TurnResult]]) -> None:
    for name, turns in together["results"].items():
        for i, (batched, solo) in enumerate(zip(turns, alone[name], strict=True)):
            where = f"{name} turn {i + 1}"
            assert batched.events[-1] == Finished("length", _plan("")[name][i].max_tokens), where
            assert np.array_equal(batched.tokens, solo.tokens), where
            assert batched.text == solo.text, where
            assert len(batched.states) == len(solo.states) == (0 if name == "base" else 2), where
            for layer, (a, b) in enumerate(zip(batched.states, solo.states)):
                assert float(np.max(np.abs(a - b))) <= TOLERANCE, f"{where}, layer {layer}"
    assert together["health"]["batch"]["mean_occupancy"] > 1.5


@pytest.mark.parametrize(("model", "adapter"), MODELS)
def test_every_session_answering_in_the_batch_equals_its_solo_run(
    engine_factory, request: pytest.FixtureRequest, model: str, adapter: str
) -> None:
    dirs = {"adapter": request.getfixturevalue(adapter), "model": request.getfixturevalue(model)}
    log: list[tuple[str, Any]] = []
    together = asyncio.run(_together(engine_factory(**dirs, prefill_chunk=CHUNK), _plan(""), log))
    # The solo runs have their own state dir (they must not read the batched engine's disk cache) and
    # prefill each prompt in one call, where the batched engine takes 32-token chunks.
    solo = engine_factory(**dirs, prefill_chunk=UNCHUNKED, max_batch=1, state="solo")
    alone = asyncio.run(_alone(solo, _plan("solo-")))
    _assert_equal_to_solo(together, alone)

    # What the scenario claims happened did happen.
    long_done = _index(log, "long", Finished)
    # A row joined while others decoded: late's first token came before long's last one.
    assert _index(log, "late", TextDelta, 1) < _index(log, "long", TextDelta, 0) < long_done
    # A row rolled back and prefilled its next turn while the others decoded.
    second = [event for who, event in log if who == "early" and isinstance(event, PromptDone)][1]
    assert 0 < second.cached_tokens < second.prompt_tokens - 1
    assert _index(log, "early", PromptDone, 2) < long_done
    # δ-off and δ-on rows decoded in the same steps.
    assert _index(log, "base", PromptDone) < long_done
    # Sessions are told apart: different conversations end in different states.
    finals = [turns[-1].states for name, turns in together["results"].items() if name != "base"]
    apart = min(
        max(float(np.max(np.abs(a - b))) for a, b in zip(finals[i], finals[j]))
        for i in range(len(finals))
        for j in range(i + 1, len(finals))
    )
    assert apart > 100 * TOLERANCE


@pytest.mark.parametrize("bits", [8, 4])
def test_batched_rows_on_quantized_kv_caches_equal_their_solo_runs_on_quantized_kv(
    engine_factory, tiny_kv_model_dir: Path, tiny_kv_adapter_dir: Path, bits: int
) -> None:
    def engine(**overrides: Any) -> Engine:
        return engine_factory(tiny_kv_adapter_dir, tiny_kv_model_dir, kv_bits=bits, **overrides)

    batched_engine = engine(prefill_chunk=CHUNK)
    together = asyncio.run(_together(batched_engine, _plan(""), []))
    alone = asyncio.run(_alone(engine(prefill_chunk=UNCHUNKED, max_batch=1, state="solo"), _plan("solo-")))
    _assert_equal_to_solo(together, alone)
    # The rows decoded on mlx-lm's quantized caches (what --kv-bits gives), δ layers included.
    caches = [s.cache for s in batched_engine.store.sessions() if s.cache is not None]
    assert caches and all(isinstance(c, QuantizedKVCache) and c.bits == bits for cache in caches for c in cache)
