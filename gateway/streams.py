"""Each customer's open task event streams (SSE and WebSocket together), held to a cap: 429 past it."""

from __future__ import annotations

import functools
from collections.abc import AsyncGenerator, Callable, Mapping

from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from control.services.auth import Principal
from gateway.ratelimit import RateLimited

__all__ = ["RETRY_AFTER_S", "HeldStream", "OpenStreams", "Slot", "TooManyStreams"]

RETRY_AFTER_S = 5
"""What a refused stream is told to wait: a place frees when one of the customer's streams ends, which nobody
can foretell, so this only keeps a client from asking again at once."""


class TooManyStreams(RateLimited):
    code = "too_many_streams"

    def __init__(self, open_now: int, cap: int) -> None:
        super().__init__(
            f"limit of {cap} open event streams per customer reached ({open_now} open, SSE and WebSocket "
            "together): close one, or wait for one to end, and retry",
            RETRY_AFTER_S,
        )
        self.details = {"limit": cap, "open": open_now, **self.details}


class Slot:
    """One open stream's place in its customer's count (none for an uncounted stream), given back by
    :meth:`release` on its first call: a stream that ends in several ways at once is counted out once."""

    def __init__(self, give_back: Callable[[], None] | None) -> None:
        self._give_back = give_back

    def release(self) -> None:
        give_back, self._give_back = self._give_back, None
        if give_back is not None:
            give_back()


class OpenStreams:
    """The task event streams open on this gateway replica, counted per customer and held to ``cap`` each: every
    stream holds a JetStream consumer and a coroutine for as long as it is open, which a customer could otherwise
    open without end. In memory, as the rate limits: each replica counts its own, so a customer may hold up to
    replicas times ``cap`` across a cluster. Admins are not counted, as the rate limits do not hold them: an
    operator watching a customer's task neither takes a place the customer counts on nor is refused because that
    customer is at the cap."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._open: dict[str, int] = {}

    def open_now(self, customer_id: str) -> int:
        return self._open.get(customer_id, 0)

    def hold(self, principal: Principal) -> Slot:
        """A place for a stream ``principal`` opens; raises :class:`TooManyStreams` if its customer holds ``cap``
        already. Checked and taken at once, with no await between: streams opened together cannot pass the cap."""
        if principal.is_admin or principal.customer_id is None:
            return Slot(None)
        customer_id = principal.customer_id
        open_now = self.open_now(customer_id)
        if open_now >= self.cap:
            raise TooManyStreams(open_now, self.cap)
        self._open[customer_id] = open_now + 1
        return Slot(functools.partial(self._release, customer_id))

    def _release(self, customer_id: str) -> None:
        left = self._open.get(customer_id, 0) - 1
        if left > 0:
            self._open[customer_id] = left
        else:  # customers with nothing open keep no entry
            self._open.pop(customer_id, None)


class HeldStream(StreamingResponse):
    """A streamed response that gives its stream's place back however it ends: the task's final status, the
    client gone, an error, or a response the server never got to send. Its body, if left at a yield (a client
    that went away while a chunk was being sent), is closed first, so its consumer goes with its place rather
    than when the generator is collected."""

    def __init__(
        self, content: AsyncGenerator[bytes, None], slot: Slot, media_type: str, headers: Mapping[str, str]
    ) -> None:
        super().__init__(content, media_type=media_type, headers=headers)
        self._content = content
        self._slot = slot

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self._content.aclose()
            finally:
                self._slot.release()
