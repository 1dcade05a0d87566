"""Server-sent events over ASGI: the event framing, and a response that notices a client leaving.

A client that disconnects must cancel its job at once, even while no event is due (a long prefill),
so the response watches the ASGI receive channel while it sends.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import TypeVar

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

T = TypeVar("T")


def sse(payload: str) -> str:
    """One server-sent event carrying `payload`."""
    return f"data: {payload}\n\n"


SSE_DONE = sse("[DONE]")


class EventStreamResponse(StreamingResponse):
    """SSE that notices a client leaving even while no event is due, and then cancels the job."""

    media_type = "text/event-stream"

    def __init__(
        self, content: AsyncIterator[str], on_disconnect: Callable[[], None], headers: Mapping[str, str]
    ) -> None:
        super().__init__(content, headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_disconnect = on_disconnect
        self._events = content

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        delivered = await until_disconnect(receive, self._pump(send), self._on_disconnect)
        if delivered is False:
            self._on_disconnect()
        if not delivered:
            aclose = getattr(self._events, "aclose", None)
            if aclose is not None:
                await aclose()

    async def _pump(self, send: Send) -> bool:
        try:
            await self.stream_response(send)
        except OSError:
            # ASGI 2.4 servers report a vanished client by failing the send.
            return False
        return True


async def until_disconnect(receive: Receive, work: Awaitable[T], on_disconnect: Callable[[], None]) -> T | None:
    """Await `work` unless the client disconnects first; then call `on_disconnect` and return None."""
    work_task = asyncio.ensure_future(work)
    watch_task = asyncio.ensure_future(_wait_for_disconnect(receive))
    try:
        await asyncio.wait({work_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        # The server itself is cancelling this request (e.g. shutting down): free its batch row too.
        on_disconnect()
        work_task.cancel()
        raise
    finally:
        watch_task.cancel()
    if work_task.done():
        return work_task.result()
    on_disconnect()
    work_task.cancel()
    try:
        await work_task
    except asyncio.CancelledError:
        pass
    return None


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
