"""The generation thread and its bridge to the event loop: tasks in, events and results out.

MLX work runs on one thread; coroutines on the server's event loop submit tasks to it and await
their results or iterate their events. Nothing here knows about models or sessions.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from typing import Any, Callable

from sidecar.engine_io import EngineEvent, Failed, Finished


class Cancelled(Exception):
    """The client went away; the job stops between two steps."""


class JobStream:
    """Events of one job, delivered from the worker thread to the event loop that submitted it."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._events: asyncio.Queue[EngineEvent] = asyncio.Queue()
        self._cancelled = threading.Event()
        self._done = False

    def __aiter__(self) -> "JobStream":
        return self

    async def __anext__(self) -> EngineEvent:
        if self._done:
            raise StopAsyncIteration
        event = await self._events.get()
        self._done = isinstance(event, (Finished, Failed))
        return event

    def cancel(self) -> None:
        """Ask the worker to stop this job at its next step."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        """True once cancel() was called."""
        return self._cancelled.is_set()

    def emit(self, event: EngineEvent) -> None:
        """Hand an event to the waiting coroutine (called from the worker thread)."""
        self._loop.call_soon_threadsafe(self._events.put_nowait, event)


class Worker:
    """One thread running queued tasks in order."""

    def __init__(self, name: str) -> None:
        self._tasks: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        """True until stop() has drained the queue."""
        return self._thread.is_alive()

    @property
    def queued(self) -> int:
        """Tasks waiting to run."""
        return self._tasks.qsize()

    def put(self, task: Callable[[], None]) -> None:
        """Queue a task that reports its own results."""
        self._tasks.put(task)

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the worker after what is queued; its result or exception, awaited."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()

        def task() -> None:
            try:
                result = fn()
            except Exception as exc:  # handed to the caller's coroutine
                loop.call_soon_threadsafe(_set_exception, future, exc)
            else:
                loop.call_soon_threadsafe(_set_result, future, result)

        self._tasks.put(task)
        return await future

    async def stop(self, timeout: float = 30.0) -> None:
        """Let the queued tasks finish, then end the thread."""
        self._tasks.put(None)
        await asyncio.to_thread(self._thread.join, timeout)

    def _run(self) -> None:
        while (task := self._tasks.get()) is not None:
            task()


def _set_result(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
