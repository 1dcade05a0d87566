"""The generation thread: which jobs run when, and how their prompts and answers share it.

Jobs wait in arrival order. A job starts when its prompt is rendered, its session is free (two jobs
of one session never run at once: the later one waits for the earlier), the batch has room
(`max_batch` rows, the one prefilling included) and, with a KV budget, the KV room it may take (its
prompt and its whole answer, as the pipeline counts it) fits beside the rooms of the jobs running
and the shared prefixes they all reference, each counted once: memory is reserved at admission, so
answering sessions, which are never evicted, cannot outgrow the budget together. A job that waits
for room holds up the jobs behind it (none overtakes it for ever); one that cannot fit even alone
starts when nothing else runs (and is refused there). Prompts are prefilled one job at a time, one
step (a chunk) at a time; between two prefill steps every decoding row gets its next token from one
batched forward pass, so a long prompt never freezes the other streams. A row that finishes or is
cancelled leaves at the next step; a job cancelled while it waits never starts. Calls (session
admin) run between two steps. What a step does is the pipeline's business (the engine's); nothing
here knows about models or sessions.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable, Collection, Generator, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from sidecar.engine.interface import ChatJob, EngineEvent, Failed, Finished
from sidecar.engine.prompt_layout import PromptLayout


class Cancelled(Exception):
    """The client went away; the job stops between two steps."""


class JobChannel:
    """Events of one job, delivered from the generation thread to the event loop that submitted it
    (the engine's JobStream, see interface.py)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._events: asyncio.Queue[EngineEvent] = asyncio.Queue()
        self._cancelled = threading.Event()
        self._done = False

    def __aiter__(self) -> "JobChannel":
        return self

    async def __anext__(self) -> EngineEvent:
        if self._done:
            raise StopAsyncIteration
        event = await self._events.get()
        self._done = isinstance(event, (Finished, Failed))
        return event

    def cancel(self) -> None:
        """Ask the generation thread to stop this job at its next step."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        """True once cancel() was called."""
        return self._cancelled.is_set()

    def emit(self, event: EngineEvent) -> None:
        """Hand an event to the waiting coroutine (called from any thread)."""
        self._loop.call_soon_threadsafe(self._events.put_nowait, event)


def emit_all(events: list[tuple[JobChannel, EngineEvent]]) -> None:
    """Hand many events to their coroutines with one wake-up per event loop, in order (a decode step's
    text for every row): each wake-up takes the event loop's thread, and the GIL, from the step."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[JobChannel, EngineEvent]]] = {}
    for channel, event in events:
        by_loop.setdefault(channel._loop, []).append((channel, event))
    for loop, batch in by_loop.items():
        loop.call_soon_threadsafe(_deliver, batch)


def _deliver(batch: list[tuple[JobChannel, EngineEvent]]) -> None:
    for channel, event in batch:
        channel._events.put_nowait(event)


@dataclass(eq=False)
class Admission:
    """A job from submission until it starts: its session, its stream, and its prompt's layout once rendered."""

    key: str  # the session key's hash: jobs with the same key never run at once
    job: ChatJob
    stream: JobChannel
    layout: PromptLayout | None = None
    ready: bool = False  # rendered: `layout` is set, or the job was refused (and told so)


class Pipeline(Protocol):
    """What the scheduler runs: the engine's prefill steps and decode steps."""

    def prefill(self, admission: Admission) -> Generator[None, None, Any]:
        """The job's steps up to its first decode step; returns its decode row, or None if it ended.

        Never raises: a job that fails is finished off (its client told) and returns None.
        """
        ...

    def decode(self, rows: list[Any]) -> list[Any]:
        """One token for every row, in one step; returns the rows that ended (finished off). Never raises."""
        ...

    def drop(self, admission: Admission) -> None:
        """End a job that never started (cancelled while it waited)."""
        ...

    def room(self, admission: Admission, busy: Collection[str]) -> tuple[int, int]:
        """The most KV bytes a rendered job will hold itself, and the bytes of the shared prefixes it and
        the running jobs (`busy`: their session keys) reference, each prefix once (asked only when the
        scheduler has a KV budget)."""
        ...


@dataclass
class _Call:
    fn: Callable[[], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]


_WAKE = object()  # a rendered prompt: look at the waiting jobs again
_STOP = object()


class Scheduler:
    """One generation thread that interleaves prefill steps with batched decode steps."""

    def __init__(
        self,
        pipeline: Pipeline,
        max_batch: int,
        name: str = "delta-mem-engine",
        clock: Callable[[], float] = time.perf_counter,
        kv_budget: int | None = None,
    ):
        self.max_batch = max_batch
        self.kv_budget = kv_budget
        self.steps = 0  # decode steps run
        self.row_steps = 0  # rows summed over those steps
        # How long the latest and the longest prefill step took: what a stream waits for, at most,
        # on top of a decode step, while a prompt is prefilled.
        self.prefill_step_s = 0.0
        self.longest_prefill_step_s = 0.0
        # The longest time from one decode step to the next while rows were decoding: the longest
        # a stream waited between two of its tokens (a client sees words, which may span tokens).
        self.longest_decode_interval_s = 0.0
        self._last_decode: float | None = None  # when the latest decode step began; None once the batch emptied
        self._clock = clock
        self._pipeline = pipeline
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._waiting: list[Admission] = []
        self._prefilling: tuple[Admission, Generator[None, None, Any]] | None = None
        self._rows: list[tuple[str, Any]] = []  # (session key, decode row)
        self._busy: dict[str, int] = {}  # session key of each job prefilling or decoding: its KV room
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ---- from the event loop and the render threads --------------------------------------

    @property
    def alive(self) -> bool:
        """True until stop() has let the thread end."""
        return self._thread.is_alive()

    def enqueue(self, key: str, job: ChatJob, stream: JobChannel) -> Admission:
        """Put a job in line (in arrival order); it starts once `ready` is called for it."""
        admission = Admission(key, job, stream)
        self._inbox.put(admission)
        return admission

    def ready(self, admission: Admission) -> None:
        """The job's prompt is rendered (or the job was refused): it may start."""
        admission.ready = True
        self._inbox.put(_WAKE)

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the generation thread between two steps; its result or exception, awaited."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._inbox.put(_Call(fn, loop, future))
        return await future

    async def stop(self, timeout: float = 30.0) -> None:
        """Let the started and waiting jobs finish, then end the thread."""
        self._inbox.put(_STOP)
        await asyncio.to_thread(self._thread.join, timeout)

    def stats(self) -> dict[str, Any]:
        """The batch now and on average, for /health (read from another thread: a snapshot)."""
        return {
            "max_batch": self.max_batch,
            "size": len(self._rows),
            "prefilling": int(self._prefilling is not None),
            "waiting": len(self._waiting),
            "steps": self.steps,
            "mean_occupancy": round(self.row_steps / self.steps, 2) if self.steps else None,
            "prefill_step_s": round(self.prefill_step_s, 3),
            "longest_prefill_step_s": round(self.longest_prefill_step_s, 3),
            "longest_decode_interval_s": round(self.longest_decode_interval_s, 3),
        }

    # ---- on the generation thread ---------------------------------------------------------

    def busy(self, key: str) -> bool:
        """True while a job of this session is prefilling or decoding (for calls, between steps)."""
        return key in self._busy

    def busy_keys(self) -> frozenset[str]:
        """The sessions with a job prefilling or decoding."""
        return frozenset(self._busy)

    def busy_rooms(self) -> dict[str, int]:
        """The sessions with a job prefilling or decoding, and the KV room each job was admitted with."""
        return dict(self._busy)

    def grow_room(self, key: str, room: int) -> None:
        """Raise a running job's KV room to `room` when its pipeline finds that it will hold more than it
        was admitted with (a cache read back from disk holds exact buffers that then grow a step at a
        time): the jobs admitted after it are admitted beside what it really takes."""
        if key in self._busy:
            self._busy[key] = max(self._busy[key], room)

    def _run(self) -> None:
        while True:
            self._start_next()
            if not self._rows and self._prefilling is None:
                if self._stopping and not self._waiting:
                    return
                self._receive(block=True)  # nothing can run until something arrives
                continue
            self._receive(block=False)
            if self._rows:
                self._decode()
            if self._prefilling is not None:
                self._prefill()

    def _receive(self, block: bool) -> None:
        """Take what arrived: jobs in line, wake-ups, calls (run at once), the stop signal."""
        try:
            item = self._inbox.get(block=block)
        except queue.Empty:
            return
        while True:
            if isinstance(item, Admission):
                self._waiting.append(item)
            elif isinstance(item, _Call):
                _run_call(item)
            elif item is _STOP:
                self._stopping = True
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _start_next(self) -> None:
        """Drop waiting jobs that were refused or cancelled; start the first one that may start."""
        blocked: set[str] = set()  # sessions with an earlier job still in line or running
        waiting_for_room = False  # an earlier job waits for KV room: no later one overtakes it
        for admission in list(self._waiting):
            if admission.stream.cancelled:
                self._waiting.remove(admission)
                self._pipeline.drop(admission)
            elif admission.ready and admission.layout is None:
                self._waiting.remove(admission)  # refused while rendering; the client was told
            elif not waiting_for_room and self._can_start(admission, blocked):
                room = self._room_for(admission)
                if room is None:
                    waiting_for_room = True
                    continue
                self._waiting.remove(admission)
                self._busy[admission.key] = room
                self._prefilling = (admission, self._pipeline.prefill(admission))
            else:
                blocked.add(admission.key)

    def _can_start(self, admission: Admission, blocked: set[str]) -> bool:
        room = len(self._rows) < self.max_batch and self._prefilling is None
        return room and admission.ready and admission.key not in blocked and admission.key not in self._busy

    def _room_for(self, admission: Admission) -> int | None:
        """The job's KV room when it fits beside the running jobs' rooms and the shared prefixes they
        all reference (or nothing runs), else None."""
        if self.kv_budget is None:
            return 0
        room, shared = self._pipeline.room(admission, self._busy.keys())
        return room if not self._busy or sum(self._busy.values()) + room + shared <= self.kv_budget else None

    def _decode(self) -> None:
        began = self._clock()
        if self._last_decode is not None:
            self.longest_decode_interval_s = max(self.longest_decode_interval_s, began - self._last_decode)
        ended = {id(row) for row in self._pipeline.decode([row for _, row in self._rows])}
        self.steps += 1
        self.row_steps += len(self._rows)
        self._free(key for key, row in self._rows if id(row) in ended)
        self._rows = [(key, row) for key, row in self._rows if id(row) not in ended]
        self._last_decode = began if self._rows else None  # an idle wait is no stream's wait

    def _prefill(self) -> None:
        """One prefill step. A job that ends without one (its prompt was all cached, or its last
        step was the one before) joins the batch and the next job starts at once: only forward
        passes count as steps."""
        while self._prefilling is not None:
            admission, steps = self._prefilling
            began = self._clock()
            try:
                next(steps)  # the pipeline yields after each forward pass
            except StopIteration as done:
                self._prefilling = None
                if done.value is None:
                    self._free([admission.key])
                else:
                    self._rows.append((admission.key, done.value))
                self._start_next()
                continue
            self.prefill_step_s = self._clock() - began
            self.longest_prefill_step_s = max(self.longest_prefill_step_s, self.prefill_step_s)
            return

    def _free(self, keys: Iterable[str]) -> None:
        for key in keys:
            self._busy.pop(key, None)


def _run_call(call: _Call) -> None:
    try:
        result = call.fn()
    except Exception as exc:  # handed to the caller's coroutine
        call.loop.call_soon_threadsafe(_set_exception, call.future, exc)
    else:
        call.loop.call_soon_threadsafe(_set_result, call.future, result)


def _set_result(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
