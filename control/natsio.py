"""NATS connection and the JetStream streams and KV buckets Caravan relies on."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
import types
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError, BucketNotFoundError
from nats.js.kv import KeyValue

from agent.aio import nats_error_logger
from agent.protocol import EVENTS_STREAM, TASKS_STREAM

__all__ = [
    "BUCKETS",
    "CONSUMER_LIMIT",
    "NATS_UNAVAILABLE",
    "PACED_BATCH",
    "Jet",
    "NatsTooOld",
    "PacedReader",
    "connect",
    "ensure_stream",
    "fetch",
    "pull_reader",
]

log = logging.getLogger("caravan.nats")

BUCKETS = (
    "customers",
    "keys",
    "agents",
    "tasks",
    "transcripts",
    "task_index",
    "task_ended",
    "system",
    "flags",
    "services",
    "quotas",
    "teams",
    "team_state",
)
CONSUMER_LIMIT = 1_000_000
"""nats-server 2.15 caps a stream at 1,000 consumers unless the stream sets its own limit (and -1 no longer means
unlimited). Caravan has a task-queue consumer per agent and three flag watchers per agent instance, so every
stream it makes carries this limit."""
DAY_S = 86_400
NATS_UNAVAILABLE: tuple[type[Exception], ...] = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.StaleConnectionError,
    nats.errors.OutboundBufferLimitError,
    nats.js.errors.ServiceUnavailableError,
    nats.js.errors.NoStreamResponseError,
)
"""What NATS raises while it cannot answer for now (stalled, reconnecting, JetStream electing a leader, nothing
serving a stream: nats-py's no-responders for a JetStream publish, a KV write among them): a request that meets
one is answered 503, to be tried again, not 500."""


@dataclass
class Jet:
    nc: NATS
    js: JetStreamContext
    kv: dict[str, KeyValue]

    async def close(self) -> None:
        if not self.nc.is_closed:
            await self.nc.close()  # every consumer of ours is stopped by now; nothing is left to drain


async def ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    """Create the stream, or bring an existing one to ``config`` (with Caravan's consumer limit)."""
    config.max_consumers = CONSUMER_LIMIT
    try:
        await js.add_stream(config)
    except BadRequestError:
        await js.update_stream(config)


async def fetch(sub: JetStreamContext.PullSubscription, batch: int, wait: float) -> list[Msg]:
    """``sub.fetch(batch, timeout=wait)``, its lapse always :class:`nats.errors.TimeoutError` (what callers
    take for JetStream having nothing, and the API for NATS unavailable: a 503): nats-py raises a bare
    ``asyncio.TimeoutError`` when what is left of the wait runs out between its two requests, which a caller
    took for an unexpected error (a 500, a stream of task events broken off)."""
    try:
        return await sub.fetch(batch, timeout=wait)
    except nats.errors.TimeoutError:
        raise
    except TimeoutError as exc:
        raise nats.errors.TimeoutError from exc


READER_IDLE_S = 30.0
"""How long JetStream keeps a :func:`pull_reader`'s consumer unused (its process gone before it deleted it)."""


def _reader_config(config: ConsumerConfig, idle_s: float) -> ConsumerConfig:
    """``config`` for a reader's consumer of its own: without acks, in memory, one replica, dropped by JetStream
    once unused for ``idle_s``."""
    return replace(config, ack_policy=AckPolicy.NONE, inactive_threshold=idle_s, mem_storage=True, num_replicas=1)


async def _drop(js: JetStreamContext, stream: str, sub: JetStreamContext.PullSubscription, consumer: str) -> None:
    """Stop reading ``sub`` and delete its ``consumer``, whatever fails (JetStream drops it once unused for its
    idle threshold anyway)."""
    with contextlib.suppress(nats.errors.Error):
        await sub.unsubscribe()
    with contextlib.suppress(nats.errors.Error, TimeoutError):
        async with asyncio.timeout(2):
            await js.delete_consumer(stream, consumer)


@contextlib.asynccontextmanager
async def pull_reader(
    js: JetStreamContext, stream: str, config: ConsumerConfig
) -> AsyncIterator[tuple[JetStreamContext.PullSubscription, int]]:
    """A pull consumer of ``stream`` (``config``: from where, of which subject) without acks, for the block, with
    how many messages it holds (its ``num_pending`` as it is made): JetStream delivers what a fetch asks for and
    nothing else, where an ordered push consumer is fed up to the stream's end (flow-controlled) until its reader
    lets it go, however little of it the reader wants. Deleted as the block ends, however it ends: an ephemeral
    consumer nobody reads is otherwise kept until its inactive threshold, counted against the stream's
    consumers."""
    info = await js.add_consumer(stream, _reader_config(config, READER_IDLE_S))
    sub = await js.pull_subscribe_bind(info.name, stream=stream)
    try:
        yield sub, info.num_pending or 0
    finally:
        await _drop(js, stream, sub, info.name)


PACED_BATCH = 16
"""How many messages a :class:`PacedReader` fetches at once, when as many are waiting."""
PACED_IDLE_S = 300.0
"""How long JetStream keeps the consumer of a :class:`PacedReader` that asks for nothing (its caller's client reads
nothing, or the process that made it is gone); the reader makes it again, from where it was, when it asks again."""


class PacedReader:
    """The messages of ``subject`` in ``stream`` after stream sequence ``after``, in order, fetched from JetStream
    as :meth:`next` asks for them (:data:`PACED_BATCH` at a time at most) through a pull consumer of its own
    (ephemeral, without acks), deleted as the block ends: a caller that stops asking (a stream whose client reads
    nothing) holds a batch at most. An ordered push consumer is fed at JetStream's pace, not its reader's: nats-py
    answers the flow control of a consumer that stalled as soon as it hears it, however much it holds unread, so
    such a stream came to hold every message of its subject in memory, once for each time it was opened."""

    def __init__(self, js: JetStreamContext, stream: str, subject: str, after: int = 0) -> None:
        self.after = after
        """The stream sequence of the last message given (or the one given to start after)."""
        self._js = js
        self._stream = stream
        self._subject = subject
        self._sub: JetStreamContext.PullSubscription | None = None
        self._asked = time.monotonic()
        self._fetched: collections.deque[Msg] = collections.deque()
        self._waiting = 0  # (how many more the consumer held as it gave the last)

    async def __aenter__(self) -> PacedReader:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: types.TracebackType | None
    ) -> None:
        await self._close()

    async def next(self, idle: float) -> Msg:
        """The next message, its sequence kept in :attr:`after`; raises :class:`nats.errors.TimeoutError` if none
        comes within ``idle`` seconds. A consumer JetStream dropped (unused for :data:`PACED_IDLE_S`, or a
        server restarted without it) is made again, from :attr:`after`."""
        if self._sub is not None and time.monotonic() - self._asked > PACED_IDLE_S / 2 and not await self._kept():
            await self._close()
        self._asked = time.monotonic()
        while True:
            if not self._fetched:
                sub = self._sub or await self._open()
                # several only when as many wait already (nats-py's fetch of several waits for them all, or the
                # time given, once none waits: a live event would wait for those after it)
                batch = max(1, min(PACED_BATCH, self._waiting))
                try:
                    self._fetched.extend(await fetch(sub, batch, wait=idle))
                except nats.js.errors.ServiceUnavailableError:  # what a request to a consumer that is gone gets
                    if await self._kept():
                        raise
                    await self._close()
                    continue
                except nats.errors.TimeoutError:
                    if not await self._kept():
                        await self._close()
                    raise
            msg = self._fetched.popleft()
            self._waiting = msg.metadata.num_pending
            sequence = msg.metadata.sequence.stream
            if sequence > self.after:
                self.after = sequence
                return msg

    async def _open(self) -> JetStreamContext.PullSubscription:
        config = ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE if self.after else DeliverPolicy.ALL,
            opt_start_seq=self.after + 1 if self.after else None,
        )
        config = _reader_config(config, PACED_IDLE_S)
        self._sub = await self._js.pull_subscribe(self._subject, stream=self._stream, config=config)
        return self._sub

    async def _kept(self) -> bool:
        assert self._sub is not None
        try:
            await self._js.consumer_info(self._stream, self._sub._consumer)
        except nats.js.errors.NotFoundError:
            return False
        return True

    async def _close(self) -> None:
        self._fetched.clear()
        sub, self._sub = self._sub, None
        if sub is not None:
            await _drop(self._js, self._stream, sub, sub._consumer)


async def _tune_bucket(js: JetStreamContext, stream: str) -> bool:
    """KV buckets are streams too. nats-py's bucket config has no consumer limit (it makes every bucket with
    ``max_consumers=-1``), so set it on the stream; and allow direct gets (what other NATS clients make buckets
    with): a read is then one request answered with the value itself, and a whole listing one batched request (see
    ``kv_entries``). True if direct gets were off until now: a ``KeyValue`` opened before reads without them, as it
    keeps nothing else of the stream's config."""
    config = (await js.stream_info(stream)).config
    if config.max_consumers == CONSUMER_LIMIT and config.allow_direct:
        return False
    direct_before = bool(config.allow_direct)
    config.max_consumers = CONSUMER_LIMIT
    config.allow_direct = True
    await js.update_stream(config)
    return not direct_before


_log_error = nats_error_logger(log)


LEAST_SERVER_VERSION = (2, 11)
"""The oldest nats-server Caravan runs on: 2.10 refuses the consumer limit Caravan sets on its buckets' streams (a
stream update "can not change MaxConsumers"), and has no batched direct gets."""


class NatsTooOld(RuntimeError):
    """The NATS server is older than :data:`LEAST_SERVER_VERSION`."""


def require_server_version(nc: NATS) -> None:
    """Raise :class:`NatsTooOld` naming the server's version and the one needed if ``nc``'s server is older than
    :data:`LEAST_SERVER_VERSION` (it refused the control plane's start halfway, with JetStream's error alone)."""
    version = nc.connected_server_version
    if (version.major, version.minor) < LEAST_SERVER_VERSION:
        least = ".".join(map(str, LEAST_SERVER_VERSION))
        shown = f"{version.major}.{version.minor}.{version.patch}"
        raise NatsTooOld(f"NATS runs nats-server {shown}: Caravan needs nats-server {least} or later")


async def connect(url: str, name: str = "caravan-control", user: str | None = None, password: str | None = None) -> Jet:
    """Connect and make sure every stream and bucket exists (idempotent; safe for several replicas)."""

    refused = False

    async def lost() -> None:  # (the URL is not named: it may hold a login)
        if not refused:
            log.warning("NATS: disconnected; reconnecting")

    async def back() -> None:
        log.warning("NATS: reconnected")

    nc = await nats.connect(
        url,
        name=name,
        user=user,
        password=password,
        max_reconnect_attempts=-1,
        connect_timeout=5,
        error_cb=_log_error,
        disconnected_cb=lost,
        reconnected_cb=back,
    )
    try:
        require_server_version(nc)
    except NatsTooOld:
        refused = True
        await nc.close()
        raise
    js = nc.jetstream(timeout=15)
    await ensure_stream(
        js,
        StreamConfig(
            name=TASKS_STREAM,
            subjects=["caravan.tasks.>"],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            max_age=7 * DAY_S,
            duplicate_window=120,
        ),
    )
    await ensure_stream(
        js,
        StreamConfig(
            name=EVENTS_STREAM,
            subjects=["caravan.events.>"],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_age=30 * DAY_S,
            discard=DiscardPolicy.OLD,
            duplicate_window=120,
        ),
    )
    kv = {}
    for bucket in BUCKETS:
        try:
            kv[bucket] = await js.key_value(f"caravan_{bucket}")
        except BucketNotFoundError:
            history = 5 if bucket == "flags" else 1  # a flag's last few engagements, for operators
            try:
                kv[bucket] = await js.create_key_value(
                    KeyValueConfig(bucket=f"caravan_{bucket}", history=history, storage=StorageType.FILE, direct=True)
                )
            except BadRequestError:  # another replica made it since (and tuned it: not the config asked for here)
                kv[bucket] = await js.key_value(f"caravan_{bucket}")
        if await _tune_bucket(js, f"KV_caravan_{bucket}"):  # a bucket made by an older Caravan, without direct gets
            kv[bucket] = await js.key_value(f"caravan_{bucket}")
    return Jet(nc=nc, js=js, kv=kv)
