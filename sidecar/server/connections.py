"""Connections the server will hold: a cap, and deadlines for a request's headers and body.

A client that opens connections and sends half a request (or nothing) would otherwise hold a file
descriptor each for ever; a couple of thousand of them exhaust the process's open files, and then
the server can accept nothing, `/health` included. So:

- a request's headers must arrive within `header_timeout_s` of the connection opening (or of the
  previous answer ending), and its body within `body_timeout_s` of the headers;
- at most `max_connections` are open; a new one beyond that closes the connection that has waited
  longest for its client (a request being answered is never closed), so a client that sends its
  request at once, as every real one does, still gets in during a flood;
- the soft limit on open files is raised so that the cap and the server's own files fit
  (sidecar/server/connection_limits.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import Literal

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from sidecar.server.connection_limits import ConnectionLimits

log = logging.getLogger("sidecar.server.connections")

Phase = Literal["head", "body", "busy"]

_TIMEOUT_408 = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
_FULL_BODY = (
    b'{"error": {"message": "the server holds too many connections; retry", "type": "server_error", '
    b'"param": null, "code": "too_many_connections"}}'
)
_FULL_503 = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n"
    + f"content-length: {len(_FULL_BODY)}\r\n\r\n".encode()
    + _FULL_BODY
)


class _Registry:
    """The open connections, and among them those waiting for their client, longest first."""

    def __init__(self, max_connections: int) -> None:
        self.max_connections = max_connections
        self.open: set[GuardedProtocol] = set()
        self.waiting: OrderedDict[GuardedProtocol, None] = OrderedDict()

    def admit(self, connection: GuardedProtocol) -> bool:
        """Count a new connection, making room if needed; False when every one is being answered."""
        if len(self.open) >= self.max_connections:
            if not self.waiting:
                return False
            oldest, _ = next(iter(self.waiting.items()))
            log.warning("%d connections open: closed the one that waited longest for its request", len(self.open))
            self.forget(oldest)
            oldest.drop()
        self.open.add(connection)
        return True

    def set_waiting(self, connection: GuardedProtocol, waiting: bool) -> None:
        """Mark a connection as waiting for its client (it goes to the back of the queue) or not."""
        self.waiting.pop(connection, None)
        if waiting and connection in self.open:
            self.waiting[connection] = None

    def forget(self, connection: GuardedProtocol) -> None:
        """A connection that closed."""
        self.open.discard(connection)
        self.waiting.pop(connection, None)


class GuardedProtocol(H11Protocol):
    """uvicorn's h11 protocol with the cap and the deadlines of a `ConnectionLimits`.

    Subclassed per server by `guarded_protocol`, which sets `limits` and `registry`.
    """

    limits: ConnectionLimits
    registry: _Registry

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Admit the connection (or refuse it with a 503) and start the header deadline."""
        super().connection_made(transport)
        self._phase: Phase | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._heard = False  # bytes of the awaited request arrived
        if not self.registry.admit(self):
            log.warning("%d connections open, all answering requests: refused a new one", len(self.registry.open))
            transport.write(_FULL_503)
            transport.close()
            return
        self._follow()

    def data_received(self, data: bytes) -> None:
        """Parse as uvicorn does, then follow the request's progress."""
        self._heard = True
        super().data_received(data)
        self._follow()

    def on_response_complete(self) -> None:
        """An answer ended: a kept-alive connection waits for its next request from now."""
        super().on_response_complete()
        self._follow()

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget the connection and its deadline."""
        self.registry.forget(self)
        self._cancel_deadline()
        super().connection_lost(exc)

    def drop(self) -> None:
        """Close this connection to make room for a new one."""
        self._cancel_deadline()
        self.transport.close()

    def _follow(self) -> None:
        if self.transport.is_closing():
            return
        state = self.conn.their_state
        phase: Phase = "head" if state is h11.IDLE else "body" if state is h11.SEND_BODY else "busy"
        if phase == self._phase:
            return
        if phase == "head":
            self._heard = False  # a new request is awaited: none of it has come yet
        self._phase = phase
        self._cancel_deadline()
        self.registry.set_waiting(self, phase != "busy")
        if phase != "busy":
            timeout = self.limits.header_timeout_s if phase == "head" else self.limits.body_timeout_s
            self._deadline = self.loop.call_later(timeout, self._expire)

    def _expire(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self._phase == "body":
            log.warning("closed a connection whose request body did not arrive within %g s", self.limits.body_timeout_s)
        elif self._heard:
            log.warning("closed a connection whose request headers did not arrive within %g s",
                        self.limits.header_timeout_s)
            self.transport.write(_TIMEOUT_408)
        self.registry.forget(self)
        self.transport.close()

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None


def guarded_protocol(limits: ConnectionLimits) -> type[GuardedProtocol]:
    """An HTTP protocol class for uvicorn (`Config(http=...)`) that enforces `limits`."""
    return type(
        "SidecarHttpProtocol", (GuardedProtocol,), {"limits": limits, "registry": _Registry(limits.max_connections)}
    )
