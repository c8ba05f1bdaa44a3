"""uvicorn's HTTP/1.1 protocol (h11), with a deadline for a request's headers.

uvicorn times out only a keep-alive connection that stays idle after a response, and any byte that comes restarts
nothing but cancels that: a client that opened a connection and sent nothing, or sent its headers a byte every few
seconds, held the connection (and a file descriptor) for ever, and enough of them left the gateway unable to accept
any other ("slowloris"). Here a connection whose request's headers have not all come within the deadline, counted
from the connection's opening or from the end of its previous response, gets a 408 and is closed. A request's body
and a response are not timed: a task's event stream and a WebSocket stay open as long as they are used.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from gateway.errors import error_response

__all__ = ["REQUEST_TIMEOUT", "with_header_deadline"]

_TIMED_OUT = error_response(408, "request_timeout", "the request's headers did not come in time")
REQUEST_TIMEOUT = (
    b"HTTP/1.1 408 Request Timeout\r\n"
    + b"".join(b"%s: %s\r\n" % header for header in _TIMED_OUT.raw_headers)
    + b"connection: close\r\n\r\n"
    + _TIMED_OUT.body
)
"""What a connection whose request's headers did not come in time gets before it is closed: the API's error body,
written as it is (no request came for uvicorn to answer)."""


class _HeaderDeadline(H11Protocol):
    deadline_s: float = 20.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        # a request's headers came: uvicorn started its cycle, or handed the connection to a WebSocket
        if self.cycle is not cycle or self.transport.get_protocol() is not self:
            self._disarm()

    def on_response_complete(self) -> None:
        if not self.transport.is_closing():
            self._arm()  # before uvicorn reads a request it holds already (pipelined), which disarms it
        super().on_response_complete()

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.deadline_s, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.write(REQUEST_TIMEOUT)
            self.transport.close()


def with_header_deadline(deadline_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol giving a request's headers ``deadline_s`` seconds (``uvicorn.Config(http=...)``)."""
    return type("H11WithHeaderDeadline", (_HeaderDeadline,), {"deadline_s": deadline_s})
