"""uvicorn's HTTP/1.1 protocol (h11), with deadlines for a request's headers and for its body.

uvicorn times out only a keep-alive connection that stays idle after a response, and any byte that comes restarts
nothing but cancels that: a client that opened a connection and sent nothing, or sent its headers or its body a byte
every few seconds, held the connection (and a file descriptor, and for a body the route's task) for ever, and enough
of them left the gateway unable to accept any other ("slowloris"). Here:

- a connection whose request's headers have not all come within the headers' deadline, counted from the
  connection's opening or from the end of its previous response, gets a 408 and is closed;
- a request whose body has not all come within the body's deadline, counted from the end of its headers, gets a
  408 and is closed, unless its response has started (the route answered without the body: what follows the
  response is the next request's wait). The server's own waits are not the client's: while its reading is paused
  (the route has not taken what came) or the ``100 Continue`` a client asked for is not sent, the deadline does not
  end the request, and when the route reads again the body gets a whole deadline from then. The route, when the
  connection is closed, sees the client gone (``http.disconnect``).

A body's 408 carries the CORS headers the API's answers carry for the request's ``Origin`` (:mod:`gateway.cors`),
so that a page on an allowed origin reads it rather than a network error. The headers' 408 answers no request read,
so it has no Origin to answer: a browser writes a request's headers at once, and meets that 408 only on a
connection it left idle.

A 408 is not followed by a plain close: the client is most likely still sending, and a socket closed with bytes
unread, or meeting more of them, answers them with a reset that makes the client's kernel drop the 408 it had
received but not yet read (the client sees "connection reset", not the error). The answer goes, then the server's
half of the connection is shut (the client reads the answer and its end), and what the client still sends is read
and dropped until it closes its half, or ``LINGER_S`` after the answer (RFC 9112's staged close).

A response is not timed: a task's event stream and a WebSocket stay open as long as they are used, while their
client is there: every connection has TCP's keep-alive and a timeout for data its peer does not take
(``_watch_for_a_vanished_peer``), so that one whose client vanished without a word is closed in a minute or two.
A request h11 cannot read is answered 400 in the API's error shape, not in uvicorn's plain text.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Coroutine
from typing import Any

from starlette.datastructures import Headers
from starlette.responses import Response
from uvicorn._types import ASGIReceiveEvent
from uvicorn.protocols.http.h11_impl import H11Protocol, RequestResponseCycle

from gateway.cors import CorsPolicy
from gateway.errors import error_response

__all__ = ["BODY_TIMEOUT", "HEADERS_TIMEOUT", "LINGER_S", "with_request_deadlines"]

log = logging.getLogger("caravan.gateway")

LINGER_S = 2.0
"""How long a connection answered 408 reads and drops what its client still sends before it is closed, if the
client has not closed its half by then: time for the answer to reach a client across a slow network and for what it
sent meanwhile to arrive, and no more (a client that keeps sending is cut off then)."""


_UNREADABLE = (
    "its request line or a header is no HTTP/1.1 (a path holds only ASCII: write any other character"
    " percent-encoded, as UTF-8)"
)


KEEPALIVE_IDLE_S = 30
KEEPALIVE_INTERVAL_S = 10
UNACKED_S = 60


def _timed_out(what: str, cors: CorsPolicy | None = None, request: Headers | None = None) -> bytes:
    """What a connection whose request's ``what`` did not come in time gets before it is closed: the API's error body,
    written as it is (uvicorn has no response started for it, nor a request to answer when the headers are late),
    with the CORS headers ``cors`` gives the ``request`` (its headers) if there is one."""
    response = error_response(408, "request_timeout", f"the request's {what} did not come in time")
    if cors is not None and request is not None:
        cors.decorate(response.headers, request)
    return _written(response, b"408 Request Timeout")


def _written(response: Response, status: bytes) -> bytes:
    """``response`` as bytes for the connection, written as it is (no response cycle to send it), the connection
    to be closed after it."""
    return (
        b"HTTP/1.1 "
        + status
        + b"\r\n"
        + b"".join(b"%s: %s\r\n" % header for header in response.headers.raw)
        + b"connection: close\r\n\r\n"
        + response.body
    )


HEADERS_TIMEOUT = _timed_out("headers")
BODY_TIMEOUT = _timed_out("body")
"""The body's 408 to a request without CORS headers to carry (no policy, or no ``Origin``)."""


class _RequestDeadlines(H11Protocol):
    headers_deadline_s: float = 20.0
    body_deadline_s: float = 60.0
    cors: CorsPolicy | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._waiting_for_body = False
        self._lingering = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        _watch_for_a_vanished_peer(transport.get_extra_info("socket"))
        self._arm_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self._lingering:  # answered 408: what still comes is dropped
            super().data_received(data)

    def shutdown(self) -> None:
        if self._lingering:
            self.transport.close()  # the server stops: no more waiting for the client
        else:
            super().shutdown()

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.transport.get_protocol() is not self:  # handed to a WebSocket
            self._disarm()
        elif self.cycle is not cycle:  # a request's headers came: uvicorn started its cycle
            self._disarm()
            if self.cycle is not None and self.cycle.more_body:
                self._arm_body()
                self.cycle.receive = self._receiving(self.cycle)  # type: ignore[method-assign]
        elif self._waiting_for_body and self.cycle is not None and not self.cycle.more_body:
            self._disarm()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request h11 cannot read (a byte HTTP does not allow in its target or a header, a
        request line that is none), in the API's error shape rather than uvicorn's plain text; the connection is
        closed, as uvicorn closes it."""
        response = error_response(400, "bad_request", f"{msg.rstrip('.')}: {_UNREADABLE}")
        self.transport.write(_written(response, b"400 Bad Request"))
        self.transport.close()

    def on_response_complete(self) -> None:
        if not self.transport.is_closing():
            self._arm_headers()  # before uvicorn reads a request it holds already (pipelined), which disarms it
        super().on_response_complete()

    def _receiving(self, cycle: RequestResponseCycle) -> Callable[[], Coroutine[Any, Any, ASGIReceiveEvent]]:
        """``cycle``'s receive, which the route calls for the body: when it finds the client made to wait (reading
        paused, a ``100 Continue`` not sent), the wait ends and the body gets a whole deadline from then."""
        receive = cycle.receive

        async def receiving() -> ASGIReceiveEvent:
            if self.cycle is cycle and self._waiting_for_body and self._made_to_wait(cycle):
                self._arm_body()
            return await receive()

        return receiving

    def _made_to_wait(self, cycle: RequestResponseCycle) -> bool:
        """Whether the client waits on the server for ``cycle``'s body: its reading paused (the route has not taken
        what came), or the ``100 Continue`` the client asked for not sent yet."""
        return self.flow.read_paused or cycle.waiting_for_100_continue

    def _arm_headers(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.headers_deadline_s, self._headers_late)

    def _arm_body(self) -> None:
        self._disarm()
        self._waiting_for_body = True
        self._deadline = self.loop.call_later(self.body_deadline_s, self._body_late)

    def _disarm(self) -> None:
        self._waiting_for_body = False
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _headers_late(self) -> None:
        self._close_with(HEADERS_TIMEOUT, f"its request's headers did not come within {self.headers_deadline_s:g} s")

    def _body_late(self) -> None:
        self._deadline = None
        self._waiting_for_body = False
        cycle = self.cycle
        if cycle is None or cycle.response_started:
            return  # answered without the body: the headers' deadline comes when the response ends
        if self._made_to_wait(cycle):
            self._arm_body()  # the wait is the server's, not the client's
            return
        answer = _timed_out("body", self.cors, Headers(raw=list(cycle.scope["headers"])))
        self._close_with(answer, f"its request's body did not come within {self.body_deadline_s:g} s")

    def _close_with(self, answer: bytes, why: str) -> None:
        """Answers ``answer`` and ends the connection: its server half at once, the whole once the client has closed
        its half or after ``LINGER_S``, reading and dropping what comes meanwhile. The route, if one reads the body,
        hears that the client is gone."""
        self._deadline = None
        if self.transport.is_closing() or self._lingering:
            return
        log.info("408 to %s, closing the connection: %s", _address(self.client), why)
        self._unset_keepalive_if_required()
        self.transport.write(answer)
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True
            cycle.message_event.set()
        if not self.transport.can_write_eof():  # a transport that cannot half-close (TLS) is closed as before
            self.transport.close()
            return
        self._lingering = True
        self.transport.write_eof()
        self._deadline = self.loop.call_later(LINGER_S, self.transport.close)


def _watch_for_a_vanished_peer(sock: socket.socket | None) -> None:
    """TCP's own checks on a connection, so that one whose client vanished without a word (a laptop shut, a network
    changed: no FIN, no reset) is closed within a minute or two, not the quarter of an hour Linux retransmits for:
    a task's event stream held that long keeps its place among the customer's streams. Idle, the kernel asks the
    peer after :data:`KEEPALIVE_IDLE_S` and every :data:`KEEPALIVE_INTERVAL_S` after (3 times); with data unacked
    (the stream's keep-alives), it gives up after :data:`UNACKED_S`. The route then hears the client gone. A socket
    that takes none of these (another platform) is left as it is."""
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    options = [
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPIDLE", None), KEEPALIVE_IDLE_S),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPINTVL", None), KEEPALIVE_INTERVAL_S),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPCNT", None), 3),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_USER_TIMEOUT", None), UNACKED_S * 1000),
    ]
    for level, option, value in options:
        if option is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(level, option, value)


def _address(client: tuple[str, int] | None) -> str:
    return "a client" if client is None else f"{client[0]}:{client[1]}"


def with_request_deadlines(headers_s: float, body_s: float, cors: CorsPolicy | None = None) -> type[H11Protocol]:
    """uvicorn's h11 protocol giving a request's headers ``headers_s`` seconds and its body ``body_s`` seconds
    (``uvicorn.Config(http=...)``); a body's 408 carries the CORS headers of ``cors``, the app's policy."""
    deadlines = {"headers_deadline_s": headers_s, "body_deadline_s": body_s, "cors": cors}
    return type("H11WithRequestDeadlines", (_RequestDeadlines,), deadlines)
