"""Fair admission to a scarce resource: waiting requests are served round robin across clients, with a bound."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

__all__ = ["FairQueue", "QueueFull", "QueueTimeout"]


class QueueTimeout(Exception):
    """A request waited its whole bound for a slot and did not get one."""


class QueueFull(Exception):
    """So many requests are waiting already that a new one would not be served within its bound."""


@dataclass
class _Waiter:
    client: str
    future: asyncio.Future[None]


class FairQueue:
    """``slots`` requests run at once; the others wait, served one per client in turn (round robin).

    A client that sends many requests cannot starve one that sends few: each client with a waiting request
    gets the next free slot in its turn. ``acquire`` waits at most ``wait_timeout`` seconds, then raises
    :class:`QueueTimeout`. When ``max_waiting`` requests already wait, the newest of the client holding the
    most places gives its place to the newcomer (and raises :class:`QueueFull`) if the newcomer's client then
    holds no more than that one; else the newcomer gets :class:`QueueFull` at once. So a client that floods the
    queue is refused its own requests, not those of one that waits for little.
    A cancelled or timed-out waiter leaves the queue; a slot granted to it at that moment goes to the next.
    """

    def __init__(self, slots: int = 1, max_waiting: int = 64, wait_timeout: float = 120.0) -> None:
        if slots < 1:
            raise ValueError("a fair queue needs at least one slot")
        self.slots = slots
        self.max_waiting = max_waiting
        self.wait_timeout = wait_timeout
        self._busy = 0
        self._waiting: dict[str, deque[_Waiter]] = {}
        self._turns: deque[str] = deque()  # clients with waiting requests, in the order they are served

    @property
    def busy(self) -> int:
        return self._busy

    @property
    def waiting(self) -> int:
        return sum(len(q) for q in self._waiting.values())

    def waiting_by_client(self) -> dict[str, int]:
        return {client: len(q) for client, q in self._waiting.items()}

    def try_acquire(self) -> bool:
        """Take a free slot at once if nobody waits for one; False otherwise (then :meth:`acquire` waits)."""
        if self._busy < self.slots and not self._turns:
            self._busy += 1
            return True
        return False

    async def acquire(self, client: str) -> None:
        if self.try_acquire():
            return
        if self.waiting >= self.max_waiting:
            self._make_room(client)
        waiter = _Waiter(client, asyncio.get_running_loop().create_future())
        if client not in self._waiting:
            self._waiting[client] = deque()
            self._turns.append(client)
        self._waiting[client].append(waiter)
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.wait_timeout):
                await waiter.future
        except BaseException as exc:
            if waiter.future.done() and not waiter.future.cancelled() and waiter.future.exception() is None:
                self.release()  # granted just as it gave up: pass the slot on
            else:
                waiter.future.cancel()
                self._forget(waiter)
            if isinstance(exc, TimeoutError):
                ahead = self.waiting
                raise QueueTimeout(
                    f"waited {time.monotonic() - started:.0f}s for the local model without getting a turn "
                    f"({self._busy} running, {ahead} still waiting)"
                ) from None
            raise

    def release(self) -> None:
        if self._busy <= 0:
            raise RuntimeError("release() without acquire()")
        while self._turns:
            client = self._turns.popleft()
            queue = self._waiting[client]
            waiter = queue.popleft()
            if queue:
                self._turns.append(client)
            else:
                del self._waiting[client]
            if not waiter.future.done():
                waiter.future.set_result(None)  # the slot passes to it: busy stays the same
                return
        self._busy -= 1

    @contextlib.asynccontextmanager
    async def slot(self, client: str) -> AsyncIterator[None]:
        await self.acquire(client)
        try:
            yield
        finally:
            self.release()

    def _make_room(self, client: str) -> None:
        """Refuse the newest waiter of the client holding the most places, for a request of ``client``; or, when
        ``client`` would then hold more than that one, this request (raising :class:`QueueFull`)."""
        full = f"{self.waiting} requests are already waiting (at most {self.max_waiting})"
        heaviest = max(self._waiting, key=lambda c: len(self._waiting[c]), default=None)
        held = len(self._waiting.get(client, ()))
        if heaviest is None or held + 1 >= len(self._waiting[heaviest]):
            raise QueueFull(full)
        displaced = self._waiting[heaviest][-1]
        self._forget(displaced)
        if not displaced.future.done():  # (one cancelled a moment ago leaves the queue as its acquire ends)
            why = f"{full}, more of them from this caller than any other: its newest gave its place to another's"
            displaced.future.set_exception(QueueFull(why))

    def _forget(self, waiter: _Waiter) -> None:
        queue = self._waiting.get(waiter.client)
        if queue is None or waiter not in queue:
            return
        queue.remove(waiter)
        if not queue:
            del self._waiting[waiter.client]
            self._turns.remove(waiter.client)
