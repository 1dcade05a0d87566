"""A scripted stand-in for the engine, implementing EngineLike for HTTP-layer tests."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from sidecar.engine.interface import (
    ChatJob,
    EngineError,
    EngineEvent,
    EngineInfo,
    Finished,
    PromptDone,
    TextDelta,
    ToolCallFormat,
)

Script = Callable[[ChatJob], list[EngineEvent]]

QWEN3_TOOL_FORMAT = ToolCallFormat(start="<tool_call>", end="</tool_call>", parser="json_tools")


def text_events(*pieces: str, prompt_tokens: int = 7, cached_tokens: int = 0) -> list[EngineEvent]:
    """PromptDone, one TextDelta per piece, Finished('stop')."""
    return [
        PromptDone(prompt_tokens=prompt_tokens, cached_tokens=cached_tokens, snippets_written=0),
        *(TextDelta(piece) for piece in pieces),
        Finished(finish_reason="stop", completion_tokens=len(pieces)),
    ]


def echo_script(job: ChatJob) -> list[EngineEvent]:
    """Answer with the last message's text, one word per delta."""
    words = job.messages[-1].content.split(" ")
    pieces = [word if i == 0 else " " + word for i, word in enumerate(words)]
    return text_events(*pieces, prompt_tokens=sum(len(m.content) for m in job.messages))


class FakeJobStream:
    """Yields its scripted events; can be held at a gate and records cancellation."""

    def __init__(self, events: list[EngineEvent], gate: asyncio.Event | None) -> None:
        self._events = list(events)
        self._gate = gate
        self.cancelled = asyncio.Event()
        self.delivered = 0

    def __aiter__(self) -> "FakeJobStream":
        return self

    async def __anext__(self) -> EngineEvent:
        if self.cancelled.is_set():
            raise StopAsyncIteration
        if self.delivered == 1 and self._gate is not None:
            # Hold after the first event, like a long decode, until released or cancelled.
            gate_wait = asyncio.ensure_future(self._gate.wait())
            cancel_wait = asyncio.ensure_future(self.cancelled.wait())
            await asyncio.wait({gate_wait, cancel_wait}, return_when=asyncio.FIRST_COMPLETED)
            gate_wait.cancel()
            cancel_wait.cancel()
            if self.cancelled.is_set():
                raise StopAsyncIteration
        if self.delivered >= len(self._events):
            raise StopAsyncIteration
        await asyncio.sleep(0)  # let the event loop run between events, as a real worker does
        event = self._events[self.delivered]
        self.delivered += 1
        return event

    def cancel(self) -> None:
        self.cancelled.set()


class FakeEngine:
    """EngineLike with scripted answers; remembers every job and stream."""

    def __init__(
        self,
        script: Script = echo_script,
        *,
        model_id: str = "fake-model",
        tool_call_format: ToolCallFormat | None = QWEN3_TOOL_FORMAT,
        adapter: dict[str, Any] | None = None,
    ) -> None:
        self.info = EngineInfo(
            model_id=model_id,
            context_window=4096,
            adapter=adapter if adapter is not None else {"variant": "tsw", "rank": 8, "layers": 2},
            backend={"backend": "fake", "device": "cpu"},
            tool_call_format=tool_call_format,
        )
        self.script = script
        self.jobs: list[ChatJob] = []
        self.streams: list[FakeJobStream] = []
        self.gate: asyncio.Event | None = None
        self.sessions: dict[str, int] = {}
        self.closed = False

    def submit(self, job: ChatJob) -> FakeJobStream:
        self.jobs.append(job)
        self.sessions[job.key_hash] = self.sessions.get(job.key_hash, 0) + 1
        stream = FakeJobStream(self.script(job), self.gate)
        self.streams.append(stream)
        return stream

    async def health(self) -> dict[str, Any]:
        return {
            "model_id": self.info.model_id,
            "adapter": self.info.adapter,
            "backend": self.info.backend,
            "sessions": len(self.sessions),
        }

    async def reset_session(self, key_hash: str) -> bool:
        return self.sessions.pop(key_hash, None) is not None

    async def session_stats(self, key_hash: str) -> dict[str, Any] | None:
        if key_hash not in self.sessions:
            return None
        return {"turns": self.sessions[key_hash]}

    async def save_session(self, key_hash: str) -> dict[str, Any]:
        if key_hash not in self.sessions:
            raise EngineError("no such session", status=404, code="session_not_found")
        return {"saved": True}

    async def load_session(self, key_hash: str) -> dict[str, Any]:
        self.sessions.setdefault(key_hash, 0)
        return {"loaded": True}

    async def close(self) -> None:
        self.closed = True
