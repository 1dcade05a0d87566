"""The disk cache's reader: a thread that reads files, so that no read ever runs on the generation
thread, and a deadline for each read.

The generation thread hands a read over and goes on with the other rows (the engine's pipeline
yields while `PendingRead.wait` says it is not done). A read that fails, or that has not returned by
its deadline, ends as a failure: the session is replayed. A read that stalls (a file system that
hangs) keeps the thread: until it returns, later reads fail at once instead of queueing behind it,
and /health lists the stall as a problem.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

log = logging.getLogger("sidecar.kvcache.disk_cache")

T = TypeVar("T")
# A restore reads a session's whole cache: seconds for gigabytes, on a slow disk under load.
READ_DEADLINE_S = 120.0


class ReadStalled(Exception):
    """A read that did not return by its deadline, or that waits behind one that did not."""


@dataclass(eq=False)
class PendingRead(Generic[T]):
    """A read handed to the reader thread: its result once done, or the exception it failed with."""

    deadline: float
    result: T | None = None
    error: Exception | None = None
    _done: threading.Event = field(default_factory=threading.Event)

    def wait(self, timeout: float) -> bool:
        """True once the read has ended (done, failed, or past its deadline: then `error` says so)."""
        if self._done.wait(timeout):
            return True
        if time.monotonic() < self.deadline:
            return False
        self.fail(ReadStalled("a disk cache read did not return in time (the disk or file system hangs?)"))
        return True

    def fail(self, error: Exception) -> None:
        """End the read as failed (the first ending counts)."""
        if not self._done.is_set():
            self.error = error
            self._done.set()

    def finish(self, result: T) -> None:
        """End the read with its result, unless it ended already (abandoned past its deadline)."""
        if not self._done.is_set():
            self.result = result
            self._done.set()


class DiskReader:
    """One reader thread; reads run in order, each within a deadline."""

    def __init__(self, deadline_s: float = READ_DEADLINE_S):
        self.deadline_s = deadline_s
        self._queue: queue.Queue[tuple[Callable[[], object], PendingRead[object]] | None] = queue.Queue()
        self._lock = threading.Lock()
        self._busy_since: float | None = None  # when the read running now started
        self._thread = threading.Thread(target=self._loop, name="kv-disk-reader", daemon=True)
        self._thread.start()

    def read(self, action: Callable[[], T]) -> PendingRead[T]:
        """Run `action` (file reads only, never MLX) on the reader thread; its exceptions fail the read."""
        pending: PendingRead[T] = PendingRead(time.monotonic() + self.deadline_s)
        stalled = self.stalled()
        if stalled is not None:
            pending.fail(ReadStalled(stalled))
        else:
            self._queue.put((action, pending))  # type: ignore[arg-type]
        return pending

    def stalled(self) -> str | None:
        """Why reads fail at once now (a read has run past its deadline and not returned), or None."""
        with self._lock:
            since = self._busy_since
        if since is None or time.monotonic() - since < self.deadline_s:
            return None
        return f"a disk cache read has not returned for {time.monotonic() - since:.0f} s (the disk hangs?)"

    def close(self) -> None:
        """Stop the thread once the reads queued now are done (without waiting for a stalled one)."""
        self._queue.put(None)

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            action, pending = item
            with self._lock:
                self._busy_since = time.monotonic()
            try:
                pending.finish(action())
            except Exception as exc:  # the reader must outlive any one read
                pending.fail(exc)
            finally:
                with self._lock:
                    self._busy_since = None
