"""The hot path of a nats-py connection: messages written when they are sent, read by callbacks in the read loop.

nats-py hands every outgoing message to a flusher task and every incoming one to a task per subscription: each
hop of a message costs two more turns of the event loop, and a request/reply four. The agent runtime sends every
message of a team run this way, so :class:`Wire` shortens it on the same connection:

- :meth:`Wire.send` writes a message to the socket at once, after whatever nats-py still holds, so the order of
  everything sent on the connection is kept. :meth:`Wire.hold` keeps what is sent next, to write it as one.
- :meth:`Wire.subscribe` takes a plain function, called with each message, in order, as its bytes arrive. It
  must not block: it spawns whatever takes time. The socket's reader hands whole messages for these
  subscriptions to their callbacks itself, ahead of nats-py's read loop, whenever nats-py holds no bytes of its
  own (nothing unread, nothing half-parsed); anything else (a PING, a message with headers or for nats-py's own
  subscriptions, half a frame) goes to nats-py's read loop, and so does all that follows until it has read it,
  so the order is kept. A message read ahead costs its process about a third less CPU: no stream buffer, no
  turn of the read loop's task, no pass of nats-py's parser (on 2 shared cores, 39 microseconds against 59 for
  one that a process wakes for; a bare asyncio protocol takes 22). ``CARAVAN_FAST_READ=0`` leaves every message
  to nats-py's read loop (to compare, or to debug).
- :meth:`Wire.ask` is a request whose answer comes back through one inbox subscription, as a future. While a
  request waits, the event loop polls the socket rather than sleeping, for at most :attr:`Wire.spin_s` after
  the latest request (``CARAVAN_SPIN_US``, 500 by default; 0 turns it off). On a shared 2-core machine a message
  took 95-110 microseconds from one process's write to a sleeping process's callback, and 30-60 to one that
  polls, in a request/reply of about 250; polling costs at most the window in CPU when the answer is slow (a
  model call: seconds). It yields the CPU at each turn
  (``sched_yield``), so that a process with work to do on the same core goes first. Only callers that wait
  poll: a process that answers, only publishes (a team's members), or stores events without waiting
  (:meth:`Wire.store`), sleeps as before. So does a team's manager that has asked a member to speak: it used to
  poll for the answer, which comes on the group's subject, but once messages were read ahead (above) that
  made a team's run slower (README: "The hot path").
- :meth:`Wire.store` publishes to a JetStream stream without waiting; its future settles with the acknowledgement
  or the error JetStream answered (nats-py's ``publish_async`` never settles one that JetStream refuses).

On a connection with a Wire, nats-py's ``flush()`` also writes what nats-py holds before its PING (it wrote the
PING first, so a flush right after a subscribe could return before the server had the subscription), and its
``_close()`` (``close()``, the end of ``drain()``, a reconnect that gave up) fails the requests still waiting
with ``nats.errors.ConnectionClosedError`` (no answer can come: they would wait for their timeout).
:meth:`Wire.flush` is the flush to call: nats-py's cancels its PONG's future when it times out or is cancelled,
and the PONG that comes late (from a server that stalled) then raises ``InvalidStateError`` in nats-py's read
loop, which stops reading for good: the connection says it is up and hears nothing.

Everything else stays nats-py's: connecting, auth, TLS, pings, reconnects (nats-py restores subscriptions under
the same ids, so the callbacks keep working), draining and JetStream. While the connection is down, sending
falls back to nats-py's publish, which buffers. One Wire serves a connection however many runtimes share it.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.protocol.command import hpub_cmd, pub_cmd
from nats.protocol.parser import AWAITING_CONTROL_LINE, MAX_CONTROL_LINE_SIZE

__all__ = [
    "DEFAULT_SPIN_US",
    "FAST_READ_ENV",
    "FLUSH_TIMEOUT_S",
    "SPIN_ENV",
    "STORE_TIMEOUT_S",
    "Storing",
    "Wire",
    "fast_read_from",
    "spin_s_from",
]

log = logging.getLogger("caravan.wire")
_NO_RESPONDERS = "503"
_BAD_SUBJECT = frozenset(" \t\r\n")
_BAD_HEADER = frozenset("\r\n")
STORE_TIMEOUT_S = 30.0
"""How long an event published without waiting may take to be stored (:meth:`Wire.store`)."""
SPIN_ENV = "CARAVAN_SPIN_US"
"""How long, in microseconds, a process polls for the answer to a request before it sleeps (see above)."""
DEFAULT_SPIN_US = 500.0
FAST_READ_ENV = "CARAVAN_FAST_READ"
"""0: every message goes through nats-py's read loop (see :attr:`Wire.fast_read`)."""
FLUSH_TIMEOUT_S = 10.0
"""How long :meth:`Wire.flush` waits for the server by default (nats-py's own default)."""


class Wire:
    """``Wire.of(nc)``: the one Wire of a connection (see the module docstring)."""

    def __init__(self, nc: NATS) -> None:
        self._nc = nc
        self._callbacks: dict[int, Callable[[Msg], None]] = {}
        self._waiting: dict[str, asyncio.Future[Msg]] = {}
        self._inbox: str | None = None
        self._inbox_lock = asyncio.Lock()
        self._tokens = itertools.count()
        self._background: set[asyncio.Task[Any]] = set()
        self._held: list[bytes] | None = None
        self.spin_s = spin_s_from(os.environ)
        """How long the event loop polls for answers after a request before it sleeps (0: never)."""
        self._spin_until = 0.0
        self._spinning = False
        self._polled = 0  # requests waiting that their callers wait for (ask's poll)
        self.fast_read = fast_read_from(os.environ)
        """Whether the socket's reader hands this Wire's messages to their callbacks (see the module docstring);
        False leaves every message to nats-py's read loop."""
        original = nc._process_msg

        async def process_msg(sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
            callback = self._callbacks.get(sid)
            if callback is None:
                await original(sid, subject, reply, data, headers)  # type: ignore[arg-type]
                return
            header = await nc._process_headers(headers) if headers else None
            self._deliver(callback, sid, subject, reply, data, header)
            self._read_ahead()  # a new connection's reader (after a reconnect) reads ahead from now on

        nc._process_msg = process_msg  # type: ignore[method-assign]
        self._read_ahead()
        send_ping = nc._send_ping

        async def send_ping_after_pending(future: asyncio.Future[bool] | None = None) -> None:
            # nats-py writes a PING straight to the socket, ahead of the commands it still holds: a flush() right
            # after a subscribe() could then see the PONG before the server had the SUB, and return early.
            self.release()
            self._write_pending()
            await send_ping(future)

        nc._send_ping = send_ping_after_pending  # type: ignore[method-assign]
        close = nc._close

        async def close_and_fail_waiting(status: int, do_cbs: bool = True) -> None:
            self.release()  # what is held goes before nats-py writes what it holds and closes
            try:
                await close(status, do_cbs)
            finally:
                if nc.is_closed:  # not the DISCONNECTED of a first connect's failed attempt
                    self._fail_waiting()

        nc._close = close_and_fail_waiting  # type: ignore[method-assign]

    @classmethod
    def of(cls, nc: NATS) -> Wire:
        wire: Wire | None = getattr(nc, "_caravan_wire", None)
        if wire is None:
            wire = cls(nc)
            nc._caravan_wire = wire  # type: ignore[attr-defined]
        return wire

    # -- sending ---------------------------------------------------------------------------------------------

    def send(self, subject: str, payload: bytes, reply: str = "", headers: dict[str, str] | None = None) -> bool:
        """Write a message now; False (nothing written) while the connection is not up, for :meth:`publish`."""
        nc = self._nc
        if not nc.is_connected or nc._transport is None:
            return False
        if _BAD_SUBJECT.intersection(subject) or _BAD_SUBJECT.intersection(reply) or not subject:
            raise nats.errors.BadSubjectError
        if len(payload) > nc._max_payload:
            raise nats.errors.MaxPayloadError
        if headers:
            if any(_BAD_HEADER.intersection(key) or _BAD_HEADER.intersection(value) for key, value in headers.items()):
                raise ValueError("a header may not hold a line break")
            lines = "".join(f"{key}: {value}\r\n" for key, value in headers.items())
            command = hpub_cmd(subject, reply, f"NATS/1.0\r\n{lines}\r\n".encode(), payload)
        else:
            command = pub_cmd(subject, reply, payload)
        self._write_pending()  # what nats-py holds goes first
        if self._held is not None:
            self._held.append(command)
        else:
            nc._transport.write(command)
        nc.stats["out_msgs"] += 1
        nc.stats["out_bytes"] += len(payload)
        return True

    def _write_pending(self) -> None:
        nc = self._nc
        if nc._pending and nc._transport is not None and nc.is_connected:
            if self._held is not None:
                self._held.extend(nc._pending)
            else:
                nc._transport.writelines(nc._pending)
            nc._pending = []
            nc._pending_data_size = 0

    def hold(self) -> None:
        """Keep what is sent from now on (nats-py's own commands too, so the order stays) and write it as one at
        :meth:`release`, or at the latest once the callbacks ready on this turn of the event loop have run, or
        before a ``flush()``'s PING. Messages that go out together cost the server one read and their readers
        one wake-up, where each costs a context switch on a busy machine."""
        if self._held is None:
            self._held = []
            asyncio.get_running_loop().call_soon(self.release)

    def release(self) -> None:
        """Write what :meth:`hold` kept; a no-op when nothing is held."""
        held, self._held = self._held, None
        if not held:
            return
        nc = self._nc
        if nc.is_connected and nc._transport is not None:
            nc._transport.writelines(held)
        elif not nc.is_closed:  # the connection went down meanwhile: nats-py sends them after its reconnect
            nc._pending[:0] = held
            nc._pending_data_size += sum(len(command) for command in held)

    async def publish(
        self, subject: str, payload: bytes, reply: str = "", headers: dict[str, str] | None = None
    ) -> None:
        """:meth:`send`, or nats-py's publish while the connection is down; waits while the socket is full."""
        if self.send(subject, payload, reply, headers):
            assert self._nc._transport is not None  # send() wrote to it
            await self._nc._transport.drain()  # returns at once unless the socket's buffer is full
        else:
            await self._nc.publish(subject, payload, reply=reply, headers=headers)

    def send_soon(
        self, subject: str, payload: bytes, reply: str = "", headers: dict[str, str] | None = None
    ) -> asyncio.Task[None] | None:
        """:meth:`send` from a callback: when the connection is down, nats-py's publish runs in a task (returned:
        it fails if nats-py cannot hold the message, say with ``OutboundBufferLimitError`` when its buffer for
        the reconnect is full; the failure is logged)."""
        if self.send(subject, payload, reply, headers) or self._nc.is_closed:
            return None
        task = asyncio.ensure_future(self._nc.publish(subject, payload, reply=reply, headers=headers))
        self._background.add(task)
        task.add_done_callback(self._sent)
        return task

    def _sent(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("could not publish: %s", task.exception())

    async def flush(self, within_s: float = FLUSH_TIMEOUT_S) -> None:
        """What nats-py's ``flush()`` does: return once the server has everything sent so far (a PING, answered
        by a PONG), or raise ``nats.errors.FlushTimeoutError`` after ``within_s``. But one that times out or is
        cancelled leaves its PONG's future to the PONG, which settles it harmlessly whenever it comes (see the
        module docstring); nats-py answers PONGs in order, so it is never another's. Returns at once while the
        connection is down: nats-py sends the subscriptions again, first, when it reconnects."""
        nc = self._nc
        if nc.is_closed:
            raise nats.errors.ConnectionClosedError
        if not nc.is_connected or nc._transport is None:
            return
        pong: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        await nc._send_ping(pong)  # (Wire's: after what is pending)
        try:
            await asyncio.wait_for(asyncio.shield(pong), within_s)
        except TimeoutError:
            raise nats.errors.FlushTimeoutError from None

    # -- receiving -------------------------------------------------------------------------------------------

    def _deliver(
        self,
        callback: Callable[[Msg], None],
        sid: int,
        subject: bytes,
        reply: bytes,
        data: bytes,
        headers: dict[str, str] | None = None,
    ) -> None:
        nc = self._nc
        nc.stats["in_msgs"] += 1
        nc.stats["in_bytes"] += len(data)
        msg = Msg(_client=nc, subject=subject.decode(), reply=reply.decode(), data=data, headers=headers, _sid=sid)
        try:
            callback(msg)
        except Exception:  # the read loop must go on: one bad callback cannot stop the connection
            log.exception("callback for %s failed", msg.subject)

    def _read_ahead(self) -> None:
        """Have the connection's socket reader hand this Wire's messages to their callbacks as the bytes arrive,
        ahead of nats-py's read loop (see :meth:`_take`); once per reader (a reconnect makes a new one)."""
        transport = self._nc._transport
        reader = getattr(transport, "_io_reader", None)  # nats-py's TCP transport (TLS too); not its websocket one
        if not isinstance(reader, asyncio.StreamReader) or "feed_data" in vars(reader):
            return
        parser = self._nc._ps
        feed = reader.feed_data

        def feed_data(data: bytes) -> None:
            # Only when nats-py holds no bytes of its own: nothing unread in the reader, nothing half-parsed.
            held = reader._buffer or parser.buf or parser.state != AWAITING_CONTROL_LINE  # type: ignore[attr-defined]
            if self.fast_read and not held and data[:4] == b"MSG ":
                data = self._take(data)
                if not data:
                    return
            feed(data)

        reader.feed_data = feed_data  # type: ignore[method-assign,assignment]

    def _take(self, data: bytes) -> bytes:
        """Deliver the whole ``MSG`` frames for this Wire's subscriptions at the start of ``data``, in order;
        the bytes left (anything else: a PING, a message with headers or for nats-py's own subscriptions, half
        a frame, a line nats-py will refuse) go to nats-py's read loop as they came."""
        start, end = 0, len(data)
        while data.startswith(b"MSG ", start):
            eol = data.find(b"\r\n", start, start + MAX_CONTROL_LINE_SIZE)
            args = data[start + 4 : eol].split() if eol > 0 else []
            if len(args) == 3:
                subject, sid, size = args
                reply = b""
            elif len(args) == 4:
                subject, sid, reply, size = args
            else:
                break
            if not (sid.isdigit() and size.isdigit()):
                break
            number = int(sid)
            callback = self._callbacks.get(number)
            begin = eol + 2
            stop = begin + int(size)
            if callback is None or stop + 2 > end or data[stop : stop + 2] != b"\r\n":
                break
            start = stop + 2
            self._deliver(callback, number, subject, reply, data[begin:stop])
        return data[start:] if start else data

    async def subscribe(self, subject: str, callback: Callable[[Msg], None], queue: str = "") -> Subscription:
        sub = await self._nc.subscribe(subject, queue=queue)  # no callback: nats-py starts no task for it
        self._callbacks[sub._id] = callback
        return sub

    async def unsubscribe(self, sub: Subscription) -> None:
        self._callbacks.pop(sub._id, None)
        await sub.unsubscribe()

    # -- requests --------------------------------------------------------------------------------------------

    async def ready(self) -> None:
        """Subscribe the inbox that answers come back to (once per connection)."""
        async with self._inbox_lock:
            if self._inbox is None:
                inbox = self._nc.new_inbox() + "."
                await self.subscribe(inbox + "*", self.answer)
                self._inbox = inbox

    @property
    def waiting(self) -> int:
        """Requests sent and not yet answered, refused, timed out or cancelled."""
        return len(self._waiting)

    def ask(
        self,
        subject: str,
        payload: bytes,
        timeout: float,
        headers: dict[str, str] | None = None,
        *,
        poll: bool = True,
        inbox: str | None = None,
    ) -> asyncio.Future[Msg]:
        """Send a request; the future holds the answer, or ``nats.errors.TimeoutError`` /
        ``NoRespondersError`` / ``ConnectionClosedError`` (closed while it waited: while the connection is only
        down it waits on), or the error nats-py raised when it could not hold the request while down
        (``OutboundBufferLimitError``). Cancelling the future forgets the request. Call :meth:`ready` once
        first; raises ``ConnectionClosedError`` on a closed connection. ``poll``: the caller waits for the
        answer, so the event loop polls for it for a moment (:attr:`spin_s`); False for one it does not wait
        on (:meth:`store`). ``inbox``: the answer comes under this prefix (ending with ``.``) instead of the
        connection's inbox, whose owner subscribes ``<inbox>*`` with :meth:`answer` as the callback."""
        if self._inbox is None:
            raise RuntimeError("Wire.ready() was not awaited")
        if self._nc.is_closed:
            raise nats.errors.ConnectionClosedError
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Msg] = loop.create_future()
        reply = f"{inbox or self._inbox}{next(self._tokens):x}"
        self._waiting[reply] = future
        timer = loop.call_later(timeout, _expire, future)

        polled = poll and self.spin_s > 0

        def forget(_: asyncio.Future[Msg]) -> None:
            self._waiting.pop(reply, None)
            timer.cancel()
            if polled:
                self._polled -= 1

        future.add_done_callback(forget)
        if polled:
            self._polled += 1
            self._spin_until = time.perf_counter() + self.spin_s
            self._poll(loop)
        try:
            publishing = self.send_soon(subject, payload, reply, headers)
        except BaseException:  # refused at once (too big, a bad subject): nothing to wait for
            future.cancel()
            raise
        if publishing is not None:  # the connection is down: a request nats-py could not hold fails now
            publishing.add_done_callback(lambda sent: _fail_unsent(sent, future))
        return future

    async def store(
        self, subject: str, payload: bytes, ack_within: float, headers: dict[str, str] | None = None
    ) -> asyncio.Future[dict[str, Any]]:
        """Publish to a JetStream stream's subject without waiting for it to be stored (only while the socket is
        full): the future holds JetStream's acknowledgement, or fails with the error it answered (or with
        ``nats.errors.TimeoutError`` after ``ack_within`` seconds).
        (nats-py's ``publish_async`` never settles its future when JetStream refuses a message: it raises the
        error inside its own callback.)"""
        acked: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        answer = self.ask(subject, payload, ack_within, headers, poll=False)  # nobody waits for it here
        answer.add_done_callback(lambda answered: _settle(answered, acked))
        transport = self._nc._transport
        if transport is not None and self._nc.is_connected:
            await transport.drain()  # returns at once unless the socket's buffer is full
        return acked

    def _poll(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._spinning:
            self._spinning = True
            loop.call_soon(self._turn, loop)

    @property
    def spinning(self) -> bool:
        """Whether the event loop is polling for answers now (see :attr:`spin_s`)."""
        return self._spinning

    def _turn(self, loop: asyncio.AbstractEventLoop) -> None:
        """One turn of polling: a callback ready on every turn of the event loop makes it poll its sockets
        without waiting; it stops when no request polled for waits any more or its window has passed."""
        if self._polled and time.perf_counter() < self._spin_until:
            os.sched_yield()
            loop.call_soon(self._turn, loop)
        else:
            self._spinning = False

    def _fail_waiting(self) -> None:
        waiting, self._waiting = self._waiting, {}
        for future in waiting.values():
            if not future.done():
                future.set_exception(nats.errors.ConnectionClosedError())

    def answer(self, msg: Msg) -> None:
        """The callback of an inbox's subscription: settles the request that ``msg`` answers (see :meth:`ask`)."""
        future = self._waiting.get(msg.subject)
        if future is None or future.done():
            return
        if msg.headers and msg.headers.get("Status") == _NO_RESPONDERS and not msg.data:
            future.set_exception(nats.errors.NoRespondersError())
        else:
            future.set_result(msg)


def spin_s_from(env: Mapping[str, str]) -> float:
    """:attr:`Wire.spin_s` as ``env`` sets it (``CARAVAN_SPIN_US``); ValueError names a bad value."""
    raw = env.get(SPIN_ENV, "")
    try:
        micros = float(raw) if raw else DEFAULT_SPIN_US
    except ValueError:
        micros = -1.0
    if not 0 <= micros <= 1_000_000:  # NaN too
        raise ValueError(f"{SPIN_ENV} must be a number of microseconds from 0 to 1000000, not {raw!r}")
    return micros / 1e6


def fast_read_from(env: Mapping[str, str]) -> bool:
    """:attr:`Wire.fast_read` as ``env`` sets it (``CARAVAN_FAST_READ``: 1, the default, or 0); ValueError names a
    bad value."""
    raw = env.get(FAST_READ_ENV, "1")
    if raw not in ("0", "1"):
        raise ValueError(f"{FAST_READ_ENV} must be 1 (read whole messages ahead of nats-py) or 0, not {raw!r}")
    return raw == "1"


def _settle(answer: asyncio.Future[Msg], acked: asyncio.Future[dict[str, Any]]) -> None:
    if acked.done():
        return
    if answer.cancelled():
        acked.cancel()
        return
    error = answer.exception()
    reply: dict[str, Any] = {}
    if error is None:
        try:
            reply = json.loads(answer.result().data)
            if "error" in reply:
                nats.js.errors.APIError.from_error(reply["error"])  # raises the error's own class, as js.publish
        except (ValueError, TypeError, AttributeError, KeyError, nats.js.errors.APIError) as exc:
            error = exc
    if error is None:
        acked.set_result(reply)
    else:
        acked.set_exception(error)


class Storing:
    """Events of one run published with :meth:`Wire.store`: :meth:`stored` waits until JetStream has them all
    (a status or result that follows only those). Each acknowledgement times out on its own."""

    def __init__(self) -> None:
        self._acks: list[asyncio.Future[dict[str, Any]]] = []
        self._error: BaseException | None = None

    def add(self, acked: asyncio.Future[dict[str, Any]]) -> None:
        self._acks.append(acked)

    async def stored(self) -> BaseException | None:
        """Wait for the events added so far; the first error of the run if one was not stored, or not in time
        (every later call says it again: a run that lost an event must not end as if it had not)."""
        acks, self._acks = self._acks, []
        results = await asyncio.gather(*acks, return_exceptions=True)
        if self._error is None:
            self._error = next((r for r in results if isinstance(r, BaseException)), None)
        return self._error


def _fail_unsent(sent: asyncio.Task[None], future: asyncio.Future[Msg]) -> None:
    if future.done():
        return
    if sent.cancelled():
        future.cancel()
    elif (error := sent.exception()) is not None:
        future.set_exception(error)


def _expire(future: asyncio.Future[Msg]) -> None:
    if not future.done():
        future.set_exception(nats.errors.TimeoutError())
