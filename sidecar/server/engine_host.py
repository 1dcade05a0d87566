"""An engine or none: loaded at start, unloaded after a quiet spell, loaded again by the next request.

The host sits around the engine (sidecar/engine/) and uses only `load_engine(settings)` and
`Engine.close()`. Every request that needs the engine holds a lease from `acquire()` to
`release()`; a chat answer's job holds its own until its stream ends, so a streamed answer keeps
the model loaded after its route returned. When no lease has been held for `keep_alive_s`, the
host closes the engine (which saves every session and waits for the disk writer, so each
session's KV is on disk), drops it, and frees MLX's buffer cache. HTTP goes on: `/health` says the
model is unloaded, and the next request loads it (requests arriving meanwhile wait for that load)
and restores its session from the disk cache.

Load and unload run under one lock: a request that arrives while the model is being unloaded
waits for the unload to end, then loads it again.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import platform
import sys
import time
import weakref
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Literal

from common.settings import SidecarSettings
from sidecar.engine.interface import ChatJob, EngineEvent, EngineLike, Failed, Finished, JobStream
from sidecar.server.protocol import ApiError
from sidecar.server.serving import ChatCompletionService

log = logging.getLogger("sidecar.server.engine_host")

EngineLoader = Callable[[SidecarSettings], EngineLike]
# (seconds the load took, whether it was the process's first) -> None
LoadListener = Callable[[float, bool], None]
ModelState = Literal["loading", "loaded", "unloading", "unloaded", "failed"]


def release_mlx_memory() -> None:
    """Collect the dropped engine's arrays, hand MLX's buffer cache back, and the C heap's free pages."""
    gc.collect()
    mx = sys.modules.get("mlx.core")  # only a real engine imported MLX; a fake engine has nothing to free
    if mx is not None:
        mx.clear_cache()
    _trim_heap()


def _trim_heap() -> None:
    # Freed small blocks stay in the C allocator's arenas, counted in RSS, until it is told to give
    # them back: glibc's malloc_trim (measured here: 171 → 98 MB after an unload), macOS's
    # malloc_zone_pressure_relief.
    try:
        libc = ctypes.CDLL(None)
        if platform.system() == "Linux":
            libc.malloc_trim(0)
        elif platform.system() == "Darwin":
            libc.malloc_zone_pressure_relief(None, 0)
    except (OSError, AttributeError):  # another C library: nothing to trim with
        log.debug("no allocator trim on this platform")


class EngineHost:
    """Owns the engine (or none), counts the requests using it, and unloads it when they stop."""

    def __init__(
        self,
        settings: SidecarSettings,
        loader: EngineLoader,
        *,
        release_memory: Callable[[], None] = release_mlx_memory,
        on_loaded: LoadListener | None = None,
    ) -> None:
        self.settings = settings
        self.keep_alive_s = settings.keep_alive_s
        self.chat: ChatCompletionService | None = None
        self.state: ModelState = "loading"
        self.load_failure: BaseException | None = None
        self.loads = 0
        self.unloads = 0
        self.last_load_s: float | None = None
        self._loader = loader
        self._release_memory = release_memory
        self._on_loaded = on_loaded
        self._lock = asyncio.Lock()
        self._in_flight = 0
        self._idle_timer: asyncio.TimerHandle | None = None
        self._unloading: asyncio.Task[None] | None = None
        self._closed = False

    # ---- what the routes use -----------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Requests and answers holding the engine now."""
        return self._in_flight

    @property
    def load_error(self) -> str | None:
        """Why the model failed to load, for /health and 503 answers."""
        failure = self.load_failure
        return None if failure is None else f"{type(failure).__name__}: {failure}"

    @property
    def serving(self) -> bool:
        """True once the model loaded at least once and has not failed since: loaded, or loadable on demand."""
        return self.loads > 0 and self.load_failure is None

    async def acquire(self) -> ChatCompletionService:
        """The chat service, loading the model first if it is unloaded; the caller must release() once done.

        Before the first load has ended (and after a failed load) this is a 503 that says why, as
        it always was; after an unload the request waits for the model to load again instead.
        """
        self._check_available()
        self._in_flight += 1
        self._cancel_idle_timer()
        try:
            if self.chat is None:
                async with self._lock:
                    if self.chat is None:
                        await self._load()
            self._check_available()
            assert self.chat is not None
            return self.chat
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """A lease from acquire() ended; the last one starts the idle timer."""
        self._in_flight -= 1
        if self._in_flight == 0:
            self._arm_idle_timer()

    @asynccontextmanager
    async def engine(self) -> AsyncIterator[EngineLike]:
        """The loaded engine for one session call (loaded on demand), held for the call's duration."""
        chat = await self.acquire()
        try:
            yield chat.engine
        finally:
            self.release()

    def end_answers(self) -> None:
        """End every answer still running (the server is stopping)."""
        if self.chat is not None:
            self.chat.end_answers()

    def describe(self) -> dict[str, Any]:
        """The model's state for /health and /ready."""
        return {
            "model_state": self.state,
            "keep_alive_s": self.keep_alive_s,
            "model_loads": self.loads,
            "model_unloads": self.unloads,
            "last_load_s": None if self.last_load_s is None else round(self.last_load_s, 2),
        }

    # ---- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the model for the first time (the server answers meanwhile); arm the idle timer."""
        async with self._lock:
            await self._load()
        if self._in_flight == 0:
            self._arm_idle_timer()

    async def close(self) -> None:
        """Stop unloading, and close the engine if one is loaded (the server is shutting down)."""
        self._closed = True
        self._cancel_idle_timer()
        async with self._lock:
            chat, self.chat = self.chat, None
            if chat is not None:
                await chat.engine.close()

    async def unload_now(self) -> bool:
        """Unload the model unless a request holds it; True when it was unloaded."""
        async with self._lock:
            if self._in_flight or self.chat is None or self._closed:
                return False
            began = time.monotonic()
            chat, self.chat = self.chat, None
            self.state = "unloading"
            try:
                # Saves every session and waits for the disk writer: their KV is on disk from here on.
                await chat.engine.close()
            finally:
                del chat
                self._release_memory()
                self.state = "unloaded"
                self.unloads += 1
        log.info(
            "no request for %g s: model %s unloaded in %.1f s (sessions are on disk; the next request loads it)",
            self.keep_alive_s, self.settings.model_id, time.monotonic() - began,
        )
        return True

    # ---- inside -------------------------------------------------------------------------------

    def _check_available(self) -> None:
        if self.load_failure is not None:
            raise ApiError(
                503, f"the model failed to load: {self.load_error}", type="server_error", code="model_load_failed"
            )
        if self.loads == 0:
            raise ApiError(
                503, "the model is still loading; retry in a few seconds", type="server_error", code="model_loading"
            )

    async def _load(self) -> None:
        """Load the engine (the lock is held); a failure is kept in load_failure."""
        first = self.loads == 0
        self.state = "loading"
        if not first:
            log.info("loading model %s again for a request (it was unloaded when idle)", self.settings.model_id)
        began = time.monotonic()
        try:
            engine = await asyncio.to_thread(self._loader, self.settings)
        except Exception as exc:
            log.exception("loading the model failed")
            self.load_failure = exc
            self.state = "failed"
            return
        elapsed = time.monotonic() - began
        if self._closed:  # the server stopped while this load ran
            await engine.close()
            return
        self.chat = ChatCompletionService(_LeasedEngine(engine, self), self.settings)
        self.state = "loaded"
        self.loads += 1
        self.last_load_s = elapsed
        log.info("model %s %s in %.1f s", self.settings.model_id, "ready" if first else "loaded again", elapsed)
        if self._on_loaded is not None:
            try:
                self._on_loaded(elapsed, first)
            except Exception:  # a record of the load time is a convenience, never a reason to fail
                log.exception("could not record the model's load time")

    def _arm_idle_timer(self) -> None:
        if self.keep_alive_s <= 0 or self._closed or self.chat is None:
            return
        self._cancel_idle_timer()
        loop = asyncio.get_running_loop()
        self._idle_timer = loop.call_later(self.keep_alive_s, self._on_idle)

    def _cancel_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _on_idle(self) -> None:
        self._idle_timer = None
        if self._in_flight == 0 and (self._unloading is None or self._unloading.done()):
            self._unloading = asyncio.get_running_loop().create_task(self.unload_now())


class _LeasedEngine:
    """The engine as the chat service sees it: each submitted job holds a lease until its stream ends."""

    def __init__(self, engine: EngineLike, host: EngineHost) -> None:
        self.inner = engine
        self.info = engine.info
        self._host = host

    def submit(self, job: ChatJob) -> JobStream:
        """Submit to the engine; the model stays loaded until the job's stream ends or is cancelled."""
        stream = self.inner.submit(job)
        self._host._in_flight += 1
        return _LeasedStream(stream, self._host)

    async def health(self) -> dict[str, Any]:
        return await self.inner.health()

    async def reset_session(self, session_key: str) -> bool:
        return await self.inner.reset_session(session_key)

    async def session_stats(self, session_key: str) -> dict[str, Any] | None:
        return await self.inner.session_stats(session_key)

    async def save_session(self, session_key: str) -> dict[str, Any]:
        return await self.inner.save_session(session_key)

    async def load_session(self, session_key: str) -> dict[str, Any]:
        return await self.inner.load_session(session_key)

    async def close(self) -> None:
        await self.inner.close()


class _Lease:
    """One job's hold on the engine, released once (at its stream's end, its cancel, or its collection)."""

    def __init__(self, host: EngineHost) -> None:
        self._host = host
        self._loop = asyncio.get_running_loop()
        self.held = True

    def end(self) -> None:
        if not self.held:
            return
        self.held = False
        # Usually called on the loop; a stream collected on another thread hands the release over.
        self._loop.call_soon_threadsafe(self._host.release)


class _LeasedStream:
    """A job's event stream that releases its lease at Finished or Failed, on cancel, or when dropped."""

    def __init__(self, stream: JobStream, host: EngineHost) -> None:
        self._stream = stream
        self._lease = _Lease(host)
        # A stream abandoned without an end or a cancel (an error while sending it) still lets go.
        weakref.finalize(self, self._lease.end)

    def __aiter__(self) -> "_LeasedStream":
        return self

    async def __anext__(self) -> EngineEvent:
        try:
            event = await self._stream.__anext__()
        except BaseException:
            self._lease.end()
            raise
        if isinstance(event, (Finished, Failed)):
            self._lease.end()
        return event

    def cancel(self) -> None:
        """Cancel the job; the engine finishes it on its own (close() waits for that)."""
        self._stream.cancel()
        self._lease.end()
