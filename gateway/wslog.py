"""uvicorn's WebSocket protocols (websockets-sansio, its default, and wsproto) log ``ASGI callable returned without
completing handshake.`` at ERROR after sending a denial response of the application's (the ASGI
``websocket.http.response`` extension: a 401 for a bad token), though nothing went wrong, and they have already
logged the refusal at INFO (``"WebSocket /path" 401``). An attacker with bad tokens could then fill an operator's
error logs. :func:`denial_sent` counts each denial; the filter (:func:`install`, as ``create_app`` does) drops one
such message per denial sent within the last few seconds, so the same message after an application that really
returned without answering still shows."""

from __future__ import annotations

import logging
import time
from collections import deque

__all__ = ["denial_sent", "install"]

_UNFINISHED = "ASGI callable returned without completing handshake."
_WITHIN_S = 10.0  # uvicorn logs it as the application returns: right after the denial


class _DenialsAreAnswers(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self._sent: deque[float] = deque(maxlen=10_000)

    def sent(self) -> None:
        self._sent.append(time.monotonic())

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or record.getMessage() != _UNFINISHED:
            return True
        now = time.monotonic()
        while self._sent and now - self._sent[0] > _WITHIN_S:
            self._sent.popleft()
        if not self._sent:
            return True
        self._sent.popleft()
        return False


_FILTER = _DenialsAreAnswers()


def install() -> None:
    """Filter uvicorn's server logger (again: no harm; its filters stay when uvicorn configures its logging)."""
    logging.getLogger("uvicorn.error").addFilter(_FILTER)


def denial_sent() -> None:
    """A denial response was sent for a WebSocket handshake."""
    _FILTER.sent()
