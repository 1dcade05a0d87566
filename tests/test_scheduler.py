"""The scheduler with a scripted pipeline (no model): admission, per-session order, interleaving, calls."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Collection, Generator
from dataclasses import dataclass, field
from typing import Any

import pytest

from sidecar.engine.interface import ChatJob, ChatMessage, Finished, TextDelta
from sidecar.engine.prompt_layout import PromptLayout
from sidecar.engine.scheduler import Admission, JobChannel, Scheduler, emit_all

DEADLINE_S = 30


@dataclass(eq=False)
class FakeRow:
    name: str
    stream: JobChannel
    left: int


@dataclass
class ScriptedPipeline:
    """Prefill takes `prefill_steps` steps per job; a row decodes `tokens` steps. Logs what ran, in order."""

    prefill_steps: int = 2
    tokens: int = 3
    deltas: int | None = None  # text events per row at most (the rest of its steps stream nothing)
    log: list[tuple[str, ...]] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)
    rooms: dict[str, int] = field(default_factory=dict)  # KV room per job name (with a KV budget)
    prefix: int = 0  # bytes of a shared prefix every job references (held once, apart from the rooms)

    def prefill(self, admission: Admission) -> Generator[None, None, Any]:
        name = admission.job.messages[0].content
        self.log.append(("start", name))
        for _ in range(self.prefill_steps):
            self.log.append(("prefill", name))
            yield
        return FakeRow(name, admission.stream, self.tokens)

    def decode(self, rows: list[FakeRow]) -> list[FakeRow]:
        self.batch_sizes.append(len(rows))
        self.log.append(("decode", *sorted(row.name for row in rows)))
        ended = []
        for row in rows:
            row.left -= 1
            if self.deltas is None or self.tokens - row.left <= self.deltas:
                row.stream.emit(TextDelta("x"))
            if row.left == 0 or row.stream.cancelled:
                row.stream.emit(Finished("cancelled" if row.stream.cancelled else "length", self.tokens - row.left))
                ended.append(row)
        return ended

    def drop(self, admission: Admission) -> None:
        self.log.append(("dropped", admission.key))
        admission.stream.emit(Finished("cancelled", 0))

    def room(self, admission: Admission, busy: Collection[str]) -> tuple[int, int]:
        return self.rooms[admission.job.messages[0].content], self.prefix


def _job(name: str) -> ChatJob:
    return ChatJob(key_hash=name, messages=(ChatMessage("user", name),), max_tokens=8)


def _submit(scheduler: Scheduler, key: str, name: str | None = None) -> JobChannel:
    stream = JobChannel(asyncio.get_running_loop())
    admission = scheduler.enqueue(key, _job(name or key), stream)
    admission.layout = PromptLayout(tokens=[1, 2, 3], spans=(), starts=(), boundary=0)
    scheduler.ready(admission)
    return stream


async def _drain(stream: JobChannel) -> list[Any]:
    return [event async for event in stream]


@dataclass
class ScriptedClock:
    """Time that moves only when told: a prefill step takes 1.0, a decode step 0.25 (see TimedPipeline)."""

    now: float = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class TimedPipeline(ScriptedPipeline):
    clock: ScriptedClock = field(default_factory=ScriptedClock)

    def prefill(self, admission: Admission) -> Generator[None, None, Any]:
        steps = super().prefill(admission)
        try:
            while True:
                next(steps)
                self.clock.now += 1.0
                yield
        except StopIteration as done:
            return done.value

    def decode(self, rows: list[FakeRow]) -> list[FakeRow]:
        self.clock.now += 0.25
        return super().decode(rows)


def _run(
    pipeline: ScriptedPipeline,
    max_batch: int,
    scenario,
    clock: Callable[[], float] = time.perf_counter,
    kv_budget: int | None = None,
) -> Any:
    async def main() -> Any:
        scheduler = Scheduler(pipeline, max_batch, clock=clock, kv_budget=kv_budget)
        try:
            return await asyncio.wait_for(scenario(scheduler), DEADLINE_S)
        finally:
            await scheduler.stop()

    return asyncio.run(main())


def test_rows_decode_together_and_prefill_steps_alternate_with_decode_steps() -> None:
    pipeline = ScriptedPipeline(prefill_steps=2, tokens=10)

    async def scenario(scheduler: Scheduler) -> None:
        streams = [_submit(scheduler, key) for key in ("a", "b", "c")]
        await asyncio.gather(*(_drain(s) for s in streams))

    _run(pipeline, 8, scenario)
    assert max(pipeline.batch_sizes) == 3  # all three rows in one step at some point
    # While b prefills, a (already decoding) gets a token between b's two prefill steps.
    b_steps = [i for i, entry in enumerate(pipeline.log) if entry == ("prefill", "b")]
    assert any(pipeline.log[i][0] == "decode" for i in range(b_steps[0] + 1, b_steps[1]))
    # Prompts are prefilled one at a time, in arrival order.
    starts = [entry[1] for entry in pipeline.log if entry[0] == "start"]
    assert starts == ["a", "b", "c"]


def test_max_batch_bounds_the_rows_and_one_means_one_at_a_time() -> None:
    for max_batch in (1, 2):
        pipeline = ScriptedPipeline(prefill_steps=1, tokens=3)

        async def scenario(scheduler: Scheduler) -> None:
            streams = [_submit(scheduler, key) for key in ("a", "b", "c", "d")]
            await asyncio.gather(*(_drain(s) for s in streams))

        _run(pipeline, max_batch, scenario)
        assert max(pipeline.batch_sizes) == max_batch
        if max_batch == 1:
            # Today's behaviour: each job runs to its end before the next one starts.
            starts = [i for i, entry in enumerate(pipeline.log) if entry[0] == "start"]
            for before, after in zip(starts, starts[1:]):
                decodes = [e for e in pipeline.log[before:after] if e[0] == "decode"]
                assert decodes == [("decode", pipeline.log[before][1])] * 3


@dataclass
class RoomPipeline(ScriptedPipeline):
    """Also notes which jobs run together each time one starts."""

    running: set[str] = field(default_factory=set)
    together: list[set[str]] = field(default_factory=list)

    def prefill(self, admission: Admission) -> Generator[None, None, Any]:
        self.running.add(admission.job.messages[0].content)
        self.together.append(set(self.running))
        return (yield from super().prefill(admission))

    def decode(self, rows: list[FakeRow]) -> list[FakeRow]:
        ended = super().decode(rows)
        self.running -= {row.name for row in ended}
        return ended


def test_a_job_starts_only_when_its_kv_room_fits_beside_the_running_ones() -> None:
    # Budget 10: a and b (4 each) run together; c (5) waits for room and d (1), behind it, waits too;
    # e (12) cannot fit even alone: it starts once nothing else runs (the pipeline refuses it there).
    pipeline = RoomPipeline(prefill_steps=1, tokens=3, rooms={"a": 4, "b": 4, "c": 5, "d": 1, "e": 12})

    async def scenario(scheduler: Scheduler) -> None:
        streams = [_submit(scheduler, key) for key in ("a", "b", "c", "d", "e")]
        await asyncio.gather(*(_drain(s) for s in streams))

    _run(pipeline, 8, scenario, kv_budget=10)
    assert [entry[1] for entry in pipeline.log if entry[0] == "start"] == ["a", "b", "c", "d", "e"]
    assert pipeline.together[:2] == [{"a"}, {"a", "b"}] and pipeline.together[-1] == {"e"}
    for names in pipeline.together[:-1]:
        assert sum(pipeline.rooms[name] for name in names) <= 10, names
    assert "a" not in pipeline.together[2] or "b" not in pipeline.together[2]  # c waited for one to end


def test_a_shared_prefix_counts_once_beside_the_rooms_of_the_jobs_referencing_it() -> None:
    # Budget 10, a prefix of 4 every job references: three jobs of 2 fit together (4 + 3 × 2), a
    # fourth waits; with the prefix counted per job (6 each) only one would fit at a time.
    pipeline = RoomPipeline(prefill_steps=1, tokens=3, rooms={"a": 2, "b": 2, "c": 2, "d": 2}, prefix=4)

    async def scenario(scheduler: Scheduler) -> None:
        await asyncio.gather(*(_drain(_submit(scheduler, key)) for key in "abcd"))

    _run(pipeline, 8, scenario, kv_budget=10)
    assert {"a", "b", "c"} in pipeline.together
    assert all(4 + 2 * len(names) <= 10 for names in pipeline.together), pipeline.together


def test_two_jobs_of_one_session_never_run_at_once_and_keep_their_order() -> None:
    pipeline = ScriptedPipeline(prefill_steps=2, tokens=3)

    async def scenario(scheduler: Scheduler) -> None:
        first = _submit(scheduler, "same", "first")
        second = _submit(scheduler, "same", "second")
        other = _submit(scheduler, "other")
        await asyncio.gather(_drain(first), _drain(second), _drain(other))

    _run(pipeline, 8, scenario)
    log = pipeline.log
    first_done = max(i for i, entry in enumerate(log) if entry[0] == "decode" and "first" in entry)
    assert log.index(("start", "second")) > first_done
    # The other session did not wait for them: it started before the first job ended.
    assert log.index(("start", "other")) < first_done


def test_a_job_cancelled_while_it_waits_never_starts() -> None:
    pipeline = ScriptedPipeline(prefill_steps=1, tokens=50)

    async def scenario(scheduler: Scheduler) -> list[Any]:
        busy = _submit(scheduler, "s", "busy")
        waiting = _submit(scheduler, "s", "waiting")
        waiting.cancel()
        events = await _drain(waiting)
        busy.cancel()
        await _drain(busy)
        return events

    events = _run(pipeline, 8, scenario)
    assert events == [Finished("cancelled", 0)]
    assert ("start", "waiting") not in pipeline.log and ("dropped", "s") in pipeline.log


def test_calls_run_between_steps_and_see_which_sessions_are_busy() -> None:
    # The long job cannot end before it is cancelled, however fast the steps run: the call must be
    # answered between two of its steps (it would never be, were calls run only when idle).
    pipeline = ScriptedPipeline(prefill_steps=1, tokens=10**12, deltas=1)

    async def scenario(scheduler: Scheduler) -> tuple[bool, bool, list[Any]]:
        stream = _submit(scheduler, "long")
        assert isinstance(await stream.__anext__(), TextDelta)
        # The call is answered while the long job is still decoding.
        seen = await scheduler.call(lambda: (scheduler.busy("long"), scheduler.busy("idle")))
        stream.cancel()
        events = await _drain(stream)
        return (*seen, events)

    busy_long, busy_idle, events = _run(pipeline, 8, scenario)
    assert busy_long and not busy_idle
    assert events[-1].finish_reason == "cancelled"


def test_a_call_raising_reaches_its_caller() -> None:
    async def scenario(scheduler: Scheduler) -> None:
        with pytest.raises(ValueError, match="boom"):
            await scheduler.call(lambda: (_ for _ in ()).throw(ValueError("boom")))

    _run(ScriptedPipeline(), 8, scenario)


def test_jobs_with_nothing_to_prefill_join_the_batch_together() -> None:
    # A prompt the session already holds needs no forward pass: such jobs all join before the next step.
    pipeline = ScriptedPipeline(prefill_steps=0, tokens=3)

    async def scenario(scheduler: Scheduler) -> None:
        gate = threading.Event()
        # The generation thread waits on a call while the four jobs arrive, so that they arrive together.
        held = asyncio.ensure_future(scheduler.call(lambda: gate.wait(DEADLINE_S)))
        streams = [_submit(scheduler, key) for key in ("a", "b", "c", "d")]
        gate.set()
        assert await held
        await asyncio.gather(*(_drain(s) for s in streams))

    _run(pipeline, 8, scenario)
    assert pipeline.batch_sizes[0] == 4


def test_a_streams_longest_wait_is_one_decode_step_and_one_prefill_step_and_idle_time_is_not_counted() -> None:
    pipeline = TimedPipeline(prefill_steps=3, tokens=6)

    async def scenario(scheduler: Scheduler) -> dict[str, Any]:
        # a decodes while b's three prefill steps run between its decode steps.
        await asyncio.gather(_drain(_submit(scheduler, "a")), _drain(_submit(scheduler, "b")))
        pipeline.clock.now += 100.0  # the batch is empty: nobody waits for this
        await _drain(_submit(scheduler, "c"))
        return await scheduler.call(scheduler.stats)

    stats = _run(pipeline, 8, scenario, clock=pipeline.clock)
    assert stats["longest_prefill_step_s"] == 1.0
    assert stats["longest_decode_interval_s"] == 1.25


def test_a_steps_events_reach_their_channels_in_order_with_one_wake_up_per_loop() -> None:
    async def scenario() -> tuple[int, list[Any], list[Any]]:
        loop = asyncio.get_running_loop()
        wake_ups = 0
        real = loop.call_soon_threadsafe

        def counting(*args: Any) -> Any:
            nonlocal wake_ups
            wake_ups += 1
            return real(*args)

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
        first, second = JobChannel(loop), JobChannel(loop)
        step = [(first, TextDelta("a")), (second, TextDelta("b")), (first, TextDelta("c"))]
        emitter = threading.Thread(target=emit_all, args=(step,))  # from the generation thread, as a step does
        emitter.start()
        emitter.join()
        first.emit(Finished("stop", 2))
        firsts = [event async for event in first]
        seconds = [await asyncio.wait_for(second.__anext__(), DEADLINE_S)]
        return wake_ups, firsts, seconds

    wake_ups, firsts, seconds = asyncio.run(scenario())
    assert wake_ups == 2  # the step's three events in one wake-up, then the Finished
    assert firsts == [TextDelta("a"), TextDelta("c"), Finished("stop", 2)]
    assert seconds == [TextDelta("b")]
