"""A lease: one control-plane replica at a time does a piece of work (folding the task events, say) while the
others stand by, through one KV key written with compare-and-set.

The holder renews the key every ``ttl_s / 4``. Another replica takes it once it has seen the key unchanged for
``ttl_s`` by its own clock (no two clocks are ever compared), or as soon as it looks after the holder gave it up
(a replica that stops deletes it). A holder whose renewal finds the key taken (it was silent for too long: a pause,
NATS away) has lost it and is told so; one that cannot renew is no longer :meth:`Lease.valid` after ``ttl_s / 2``,
well before another may take it over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable

import nats.errors
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from agent.aio import cancel_and_wait

log = logging.getLogger("caravan.lease")


class Lease:
    """``await start()`` holds the lease before it returns if nobody does; ``on_acquired`` runs when this replica
    comes to hold it, ``on_lost`` when it stops holding it (taken over, or :meth:`stop`)."""

    def __init__(
        self,
        kv: KeyValue,
        key: str,
        on_acquired: Callable[[], Awaitable[None]],
        on_lost: Callable[[], Awaitable[None]],
        *,
        ttl_s: float = 10.0,
    ) -> None:
        self._kv = kv
        self._key = key
        self._on_acquired = on_acquired
        self._on_lost = on_lost
        self._ttl_s = ttl_s
        self._look_s = ttl_s / 10  # a standby looks this often
        self.holder = uuid.uuid4().hex
        self._revision: int | None = None  # of the key as this replica wrote it last, while it holds the lease
        self._renewed_at = 0.0
        self._seen: tuple[int, float] | None = None  # a standby's: the key's revision, and since when it saw it
        self._loop: asyncio.Task[None] | None = None

    @property
    def held(self) -> bool:
        return self._revision is not None

    def valid(self) -> bool:
        """Whether this replica holds the lease and renewed it lately enough that nobody else can hold it yet."""
        return self.held and time.monotonic() < self._renewed_at + self._ttl_s / 2

    async def start(self) -> None:
        if self._loop is not None:
            raise RuntimeError("lease already started")
        with contextlib.suppress(nats.errors.Error):  # NATS away: the loop looks again
            await self._look()
        self._loop = asyncio.create_task(self._run(), name=f"lease-{self._key}")

    async def stop(self) -> None:
        """Stop looking and give the lease up (the next replica to look takes it)."""
        if self._loop is not None:
            await cancel_and_wait(self._loop)
            self._loop = None
        revision = self._revision
        if revision is not None:
            await self._lose()
            with contextlib.suppress(nats.errors.Error):  # taken already, or NATS away: it lapses
                await self._kv.delete(self._key, last=revision)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._ttl_s / 4 if self.held else self._look_s)
            try:
                await (self._renew() if self.held else self._look())
            except KeyWrongLastSequenceError:  # another replica took it: this one was silent for too long
                log.warning("lease %s: taken over by another replica", self._key)
                await self._lose()
            except nats.errors.Error as exc:  # NATS away: tried again next turn
                log.warning("lease %s: %r", self._key, exc)
            except Exception:  # the work did not start (the lease was given up): looked at again next turn
                log.exception("lease %s: the work could not start", self._key)

    async def _renew(self) -> None:
        asked = time.monotonic()  # the write may take effect as soon as it is asked for: valid from then
        self._revision = await self._kv.update(self._key, self.holder.encode(), last=self._revision)
        self._renewed_at = asked

    async def _look(self) -> None:
        try:
            entry = await self._kv.get(self._key)
        except KeyNotFoundError:  # nobody holds it (never held, or given up)
            asked = time.monotonic()
            with contextlib.suppress(KeyWrongLastSequenceError):  # another replica was quicker
                await self._acquire(await self._kv.create(self._key, self.holder.encode()), asked)
            return
        now, revision = time.monotonic(), entry.revision or 0
        if self._seen is None or self._seen[0] != revision:
            self._seen = (revision, now)  # renewed since this replica last looked
        elif now - self._seen[1] >= self._ttl_s:  # not renewed for the whole ttl: its holder is gone
            with contextlib.suppress(KeyWrongLastSequenceError):
                await self._acquire(await self._kv.update(self._key, self.holder.encode(), last=revision), now)

    async def _acquire(self, revision: int, asked: float) -> None:
        self._revision, self._renewed_at, self._seen = revision, asked, None
        log.info("lease %s: held by this replica (%s)", self._key, self.holder)
        try:
            await self._on_acquired()
        except BaseException:  # the work did not start: the lease goes to whoever looks next (this one too)
            self._revision = None
            with contextlib.suppress(Exception):
                await self._on_lost()  # undoes what of the work started
            with contextlib.suppress(nats.errors.Error):
                await self._kv.delete(self._key, last=revision)
            raise

    async def _lose(self) -> None:
        self._revision = None
        await self._on_lost()
