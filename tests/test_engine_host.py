"""Unloading when idle (sidecar/server/engine_host.py) against a scripted engine: the HTTP app in-process."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from fake_engine import FakeEngine
from starlette.types import Message

from common.durations import DurationError, format_duration, parse_duration
from common.health import READY_PATH
from common.settings import SettingsError, SidecarSettings
from sidecar.server.app import ServerState, create_app
from sidecar.server.engine_host import EngineHost

MODEL = "fake-model"
USER = [{"role": "user", "content": "hello there"}]
DEADLINE_S = 10.0


def settings(keep_alive_s: float = 0.05, **changes: Any) -> SidecarSettings:
    return SidecarSettings(
        model_path="/models/fake", model_id=MODEL, state_dir="/unused/state", keep_alive_s=keep_alive_s, **changes
    )


class Loader:
    """Hands out a new FakeEngine per load; a load or a close can be held at a gate."""

    def __init__(self) -> None:
        self.engines: list[FakeEngine] = []
        self.load_gate: asyncio.Event | None = None
        self.close_gate: asyncio.Event | None = None
        self.closing = asyncio.Event()
        self.loop = asyncio.get_running_loop()

    def __call__(self, _settings: SidecarSettings) -> FakeEngine:
        if self.load_gate is not None and self.engines:
            # Runs on a worker thread: wait there for the test to open the gate.
            asyncio.run_coroutine_threadsafe(self.load_gate.wait(), self.loop).result(timeout=DEADLINE_S)
        engine = FakeEngine(model_id=MODEL)
        original_close = engine.close

        async def close() -> None:
            self.closing.set()
            if self.close_gate is not None:
                await self.close_gate.wait()
            await original_close()

        engine.close = close  # type: ignore[method-assign]
        self.engines.append(engine)
        return engine


@asynccontextmanager
async def running(
    keep_alive_s: float = 0.05, **changes: Any
) -> AsyncIterator[tuple[Any, httpx.AsyncClient, Loader, EngineHost]]:
    """The app with its lifespan running, a client on it, the loader and the app's host."""
    loader = Loader()
    app = create_app(settings(keep_alive_s, **changes), load_engine=loader)
    state: ServerState = app.state.server
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://sidecar") as client:
            await until(lambda: state.host.loads == 1, "the first load")
            yield app, client, loader, state.host


async def until(condition: Callable[[], bool], what: str = "the condition") -> None:
    """Poll the event loop until `condition()` holds, failing after DEADLINE_S."""
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {DEADLINE_S} s"
        await asyncio.sleep(0.01)


async def chat(client: httpx.AsyncClient, **body: Any) -> httpx.Response:
    return await client.post("/v1/chat/completions", json={"model": MODEL, "messages": USER, **body})


def test_durations_read_as_people_write_them() -> None:
    assert [parse_duration(t) for t in ("300", "30s", "5m", "1h", "1.5h", " 2M ")] == [300, 30, 300, 3600, 5400, 120]
    assert [parse_duration(t) for t in ("0", "never", "off")] == [0, 0, 0]
    for bad in ("", "5 minutes", "-1", "1d", "10w", "9999h"):
        with pytest.raises(DurationError):
            parse_duration(bad)
    assert [format_duration(s) for s in (0, 300, 3600, 45, 90)] == ["never", "5m", "1h", "45s", "90s"]


def test_unloading_when_idle_needs_a_state_dir() -> None:
    with pytest.raises(SettingsError, match="state dir"):
        SidecarSettings(model_path="/m", model_id=MODEL, keep_alive_s=300).validate()
    SidecarSettings(model_path="/m", model_id=MODEL, keep_alive_s=0).validate()


def test_an_idle_model_is_unloaded_and_the_next_request_loads_it_again() -> None:
    async def scenario() -> None:
        async with running() as (_, client, loader, host):
            first = await chat(client)
            assert first.status_code == 200, first.text
            await until(lambda: host.state == "unloaded", "the idle unload")
            assert loader.engines[0].closed  # close() saved the sessions before the engine was dropped
            assert host.chat is None

            health = await client.get("/health")
            assert health.status_code == 200
            assert health.json()["status"] == "ok" and health.json()["model"] == MODEL
            assert health.json()["model_state"] == "unloaded"
            assert (await client.get(READY_PATH)).status_code == 200
            assert (await client.get("/v1/models")).json()["data"][0]["id"] == MODEL
            assert len(loader.engines) == 1  # neither /health nor /v1/models loads the model

            again = await chat(client)
            assert again.status_code == 200, again.text
            assert len(loader.engines) == 2 and host.loads == 2
            assert loader.engines[1].jobs and host.unloads == 1

    asyncio.run(scenario())


def test_session_calls_load_the_model_too() -> None:
    async def scenario() -> None:
        async with running() as (_, client, loader, host):
            await until(lambda: host.state == "unloaded", "the idle unload")
            loaded = await client.post("/v1/session/load", headers={"X-Session-Affinity": "s1"})
            assert loaded.status_code == 200, loaded.text
            assert len(loader.engines) == 2

    asyncio.run(scenario())


class StreamCall:
    """A streamed chat request driven through the ASGI app by hand (httpx's transport buffers answers)."""

    def __init__(self, app: Any) -> None:
        raw = json.dumps({"model": MODEL, "messages": USER, "stream": True}).encode()
        self.sent: list[Message] = []
        self.leave = asyncio.Event()
        self._requested = False
        self._raw = raw
        scope = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "method": "POST", "scheme": "http", "path": "/v1/chat/completions",
            "raw_path": b"/v1/chat/completions", "query_string": b"", "root_path": "",
            "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8765),
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())],
        }
        self.task = asyncio.create_task(app(scope, self._receive, self._send))

    async def _receive(self) -> Message:
        if not self._requested:
            self._requested = True
            return {"type": "http.request", "body": self._raw, "more_body": False}
        await self.leave.wait()
        return {"type": "http.disconnect"}

    async def _send(self, message: Message) -> None:
        self.sent.append(message)

    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body")


def test_a_streamed_answer_holds_the_model_until_it_ends() -> None:
    async def scenario() -> None:
        async with running(keep_alive_s=3600) as (app, _, loader, host):
            engine = loader.engines[0]
            engine.gate = asyncio.Event()  # the answer holds after its first event, like a long decode
            call = StreamCall(app)
            await until(lambda: b"role" in call.body(), "the stream's first chunk")
            # The route has returned the stream, but the job still holds the engine.
            assert host.in_flight == 1
            assert await host.unload_now() is False
            engine.gate.set()
            await asyncio.wait_for(call.task, DEADLINE_S)
            assert call.body().rstrip().endswith(b"data: [DONE]")
            await until(lambda: host.in_flight == 0, "the stream's release")
            assert await host.unload_now() is True
            assert engine.closed

    asyncio.run(scenario())


def test_a_client_that_leaves_a_stream_lets_the_model_unload() -> None:
    async def scenario() -> None:
        async with running(keep_alive_s=3600) as (app, _, loader, host):
            engine = loader.engines[0]
            engine.gate = asyncio.Event()  # never opened: only the client's leaving ends the answer
            call = StreamCall(app)
            await until(lambda: b"role" in call.body(), "the stream's first chunk")
            assert host.in_flight == 1
            call.leave.set()
            await asyncio.wait_for(call.task, DEADLINE_S)
            assert engine.streams[0].cancelled.is_set()
            await until(lambda: host.in_flight == 0, "the cancelled stream's release")
            assert await host.unload_now() is True

    asyncio.run(scenario())


def test_a_request_during_the_unload_waits_for_it_then_loads_the_model_again() -> None:
    async def scenario() -> None:
        async with running(keep_alive_s=3600) as (_, client, loader, host):
            loader.close_gate = asyncio.Event()
            unloading = asyncio.create_task(host.unload_now())
            await loader.closing.wait()  # the engine is closing (saving sessions) now
            assert host.state == "unloading"
            request = asyncio.create_task(chat(client))
            await until(lambda: host.in_flight == 1, "the request's arrival")
            assert not request.done() and len(loader.engines) == 1
            loader.close_gate.set()
            assert await unloading is True
            response = await request
            assert response.status_code == 200, response.text
            assert len(loader.engines) == 2 and loader.engines[0].closed and not loader.engines[1].closed
            assert len(loader.engines[1].jobs) == 1 and not loader.engines[0].jobs

    asyncio.run(scenario())


def test_requests_arriving_while_the_model_loads_again_all_wait_for_one_load() -> None:
    async def scenario() -> None:
        async with running() as (_, client, loader, host):
            await until(lambda: host.state == "unloaded", "the idle unload")
            loader.load_gate = asyncio.Event()
            requests = [asyncio.create_task(chat(client)) for _ in range(3)]
            await until(lambda: host.state == "loading" and host.in_flight == 3, "the reload")
            health = await client.get("/health")
            assert health.status_code == 200 and health.json()["model_state"] == "loading"
            assert (await client.get(READY_PATH)).status_code == 200  # loadable: OpenClaw must not start another
            loader.load_gate.set()
            responses = await asyncio.gather(*requests)
            assert [r.status_code for r in responses] == [200, 200, 200]
            assert len(loader.engines) == 2 and len(loader.engines[1].jobs) == 3

    asyncio.run(scenario())


def test_ready_is_503_until_the_first_load_ends() -> None:
    async def scenario() -> None:
        loader = Loader()
        gate = asyncio.Event()

        def slow(settings_: SidecarSettings) -> FakeEngine:
            asyncio.run_coroutine_threadsafe(gate.wait(), loader.loop).result(timeout=DEADLINE_S)
            return loader(settings_)

        app = create_app(settings(), load_engine=slow)
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://s") as client:
                ready = await client.get(READY_PATH)
                assert ready.status_code == 503 and ready.json() == {"ready": False, "model_state": "loading"}
                assert (await chat(client)).status_code == 503  # the first load answers 503, as it always did
                gate.set()
                await until(lambda: app.state.server.host.loads == 1, "the first load")
                assert (await client.get(READY_PATH)).json() == {"ready": True, "model_state": "loaded"}

    asyncio.run(scenario())


def test_keep_alive_never_keeps_the_model() -> None:
    async def scenario() -> None:
        async with running(keep_alive_s=0) as (_, client, loader, host):
            assert (await chat(client)).status_code == 200
            await asyncio.sleep(0)  # let a (wrongly) armed timer run
            assert host._idle_timer is None and host.state == "loaded"

    asyncio.run(scenario())


def test_ready_needs_no_api_key_but_everything_else_does() -> None:
    async def scenario() -> None:
        async with running(keep_alive_s=0, api_key="secret") as (_, client, _loader, _host):
            assert (await client.get(READY_PATH)).status_code == 200  # OpenClaw's probe sends no key
            assert (await client.get("/health")).status_code == 401
            assert (await chat(client)).status_code == 401

    asyncio.run(scenario())
