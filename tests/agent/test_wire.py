"""The hot path on a nats-py connection (agent.wire): order, callbacks in the read loop, requests, reconnects,
closing."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import nats
import nats.errors
import nats.js.errors
import pytest
from nats.aio.msg import Msg

from agent.wire import DEFAULT_SPIN_US, FAST_READ_ENV, SPIN_ENV, Storing, Wire, fast_read_from, spin_s_from
from control.natsserver import EmbeddedNats
from tests.support.helpers import assert_eventually, nats_connect, now, stalled


async def collect(nc: nats.NATS, subject: str) -> list[bytes]:
    got: list[bytes] = []

    async def on(msg: Msg) -> None:
        got.append(msg.data)

    await nc.subscribe(subject, cb=on)
    await nc.flush()
    return got


async def test_a_message_sent_on_the_wire_follows_what_nats_py_still_holds(nats_server: EmbeddedNats) -> None:
    sender, reader = await nats.connect(nats_server.url), await nats_connect(nats_server.url)
    got = await collect(reader, "order")
    wire = Wire.of(sender)
    for i in range(50):
        await sender.publish("order", b"py%d" % i)  # queued for nats-py's flusher, not yet written
        assert wire.send("order", b"wire%d" % i)
    await sender.flush()
    await assert_eventually(now(lambda: len(got)), lambda n: n == 100, what="all messages")
    assert got == [x for i in range(50) for x in (b"py%d" % i, b"wire%d" % i)]
    assert Wire.of(sender) is wire  # one per connection
    await sender.close()
    await reader.close()


async def test_callbacks_run_in_order_and_one_that_fails_stops_nothing(nats_server: EmbeddedNats) -> None:
    nc = await nats.connect(nats_server.url)
    wire = Wire.of(nc)
    seen: list[bytes] = []

    def on(msg: Msg) -> None:
        seen.append(msg.data)
        if msg.data == b"3":
            raise RuntimeError("a bad callback")

    sub = await wire.subscribe("calls", on)
    plain = await collect(nc, "plain")  # nats-py's own subscriptions on the same connection still work
    for i in range(10):
        await wire.publish("calls", b"%d" % i)
        await wire.publish("plain", b"%d" % i)
    await assert_eventually(now(lambda: len(seen) + len(plain)), lambda n: n == 20, what="every message")
    assert seen == plain == [b"%d" % i for i in range(10)]
    await wire.unsubscribe(sub)
    await wire.publish("calls", b"late")
    await nc.flush()
    await wire.publish("plain", b"marker")
    await assert_eventually(now(lambda: plain[-1]), lambda last: last == b"marker", what="marker")
    assert b"late" not in seen
    await nc.close()


Seen = tuple[str, str, bytes, "dict[str, str] | None"]


def read_ahead() -> bool:
    """Whether a Wire callback runs outside any task: the socket's reader called it, not nats-py's read loop."""
    return asyncio.current_task() is None


async def test_messages_are_read_ahead_of_nats_py_in_order_whatever_else_comes(nats_server: EmbeddedNats) -> None:
    nc, sender = await nats.connect(nats_server.url), await nats_connect(nats_server.url)
    wire = Wire.of(nc)
    seen: list[Seen] = []
    ahead: list[bool] = []

    def on(msg: Msg) -> None:
        seen.append((msg.subject, msg.reply, msg.data, msg.headers))
        ahead.append(read_ahead())

    await wire.subscribe("fast.>", on)
    plain = await collect(nc, "plain")  # nats-py's own subscription on the same connection
    for i in range(5):  # one at a time: each read as it arrives
        await sender.publish("fast.one", b"%d" % i)
        await sender.flush()
        await assert_eventually(now(lambda: len(seen)), lambda n, i=i: n == i + 1, what=f"message {i}")
    assert seen == [("fast.one", "", b"%d" % i, None) for i in range(5)]
    assert all(ahead)

    # A burst of what nats-py must read itself between the Wire's messages: headers, its own subscription's
    # messages, frames bigger than a read of the socket; every message comes once, whole and in order.
    expected: list[Seen] = []
    for i in range(40):
        if i % 5 == 0:
            big = bytes([i]) * 300_000
            await sender.publish("fast.big", big)
            expected.append(("fast.big", "", big, None))
        elif i % 5 == 1:
            await sender.publish("fast.headed", b"h%d" % i, headers={"n": str(i)})
            expected.append(("fast.headed", "", b"h%d" % i, {"n": str(i)}))
        elif i % 5 == 2:
            await sender.publish("plain", b"%d" % i)
        else:
            await sender.publish("fast.small", b"s%d" % i, reply=f"answer.{i}" if i % 5 == 3 else "")
            expected.append(("fast.small", f"answer.{i}" if i % 5 == 3 else "", b"s%d" % i, None))
    await sender.flush()
    await assert_eventually(now(lambda: len(seen)), lambda n: n == 5 + len(expected), within=20, what="the burst")
    assert seen[5:] == expected
    await assert_eventually(now(lambda: plain), lambda p: p == [b"%d" % i for i in range(2, 40, 5)], what="plain")
    assert not all(ahead[5:])  # (some of the burst did wait for nats-py's read loop)

    await sender.publish("fast.last", b"last")  # nats-py has read it all: read ahead again
    await assert_eventually(now(lambda: seen[-1][0]), lambda subject: subject == "fast.last", what="last")
    assert ahead[-1]
    await nc.close()
    await sender.close()


async def test_only_whole_well_formed_frames_for_the_wire_are_read_ahead(nats_server: EmbeddedNats) -> None:
    """What the socket's reader takes of the bytes it gets: the whole frames at their start for the Wire's own
    subscriptions; the rest, byte for byte, is left to nats-py (which refuses what is malformed)."""
    nc = await nats.connect(nats_server.url)
    wire = Wire.of(nc)
    seen: list[tuple[str, str, bytes]] = []
    sid = (await wire.subscribe("w", lambda msg: seen.append((msg.subject, msg.reply, msg.data))))._id
    nats_py_sid = (await nc.subscribe("n"))._id
    whole = b"MSG w %d 2\r\nok\r\n" % sid
    replied = b"MSG w %d _INBOX.x 0\r\n\r\n" % sid
    left_alone = [
        b"PING\r\n" + whole,
        b"MSG w %d 10\r\nhalf" % sid,  # half a frame
        b"MSG w %d 2\r\nokay\r\n" % sid,  # a size that does not end where the frame does
        b"MSG w %d 1\r\nok\r\n" % sid,
        b"MSG w x%d 2\r\nok\r\n" % sid,  # a sid that is no number
        b"MSG w %d -2\r\nok\r\n" % sid,
        b"MSG w %d a b 2\r\nok\r\n" % sid,  # too many fields
        b"MSG w 2\r\nok\r\n",  # too few
        b"MSG n %d 2\r\nok\r\n" % nats_py_sid,  # nats-py's own subscription
        b"MSG w %d 2 ok" % sid,  # no end of line
        b"MSG w%s %d 2\r\nok\r\n" % (b"w" * 5000, sid),  # a control line longer than nats-py reads
        b"HMSG w %d 12 14\r\nNATS/1.0\r\n\r\nok\r\n" % sid,  # headers: nats-py parses them
    ]
    for rest in left_alone:
        seen.clear()
        assert wire._take(rest) is rest
        assert wire._take(whole + replied + rest) == rest
        assert seen == [("w", "", b"ok"), ("w", "_INBOX.x", b"")]
    assert wire._take(whole * 3) == b""
    await nc.close()


async def test_with_fast_reading_off_every_message_goes_through_nats_py(
    nats_server: EmbeddedNats, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(FAST_READ_ENV, "0")
    nc, sender = await nats.connect(nats_server.url), await nats_connect(nats_server.url)
    wire = Wire.of(nc)
    assert not wire.fast_read
    ahead: list[bool] = []
    await wire.subscribe("slow", lambda msg: ahead.append(read_ahead()))
    await nc.flush()
    for i in range(3):  # one at a time, as a message read ahead would come
        await sender.publish("slow", b"x")
        await sender.flush()
        await assert_eventually(now(lambda: len(ahead)), lambda n, i=i: n == i + 1, what=f"message {i}")
    assert ahead == [False] * 3  # all read by nats-py's read loop
    wire.fast_read = True  # from the next message on
    await sender.publish("slow", b"x")
    await assert_eventually(now(lambda: ahead), lambda a: a == [False] * 3 + [True], what="one read ahead")
    await nc.close()
    await sender.close()


@pytest.mark.parametrize(("value", "on"), [(None, True), ("1", True), ("0", False)])
def test_fast_reading_comes_from_the_environment(value: str | None, on: bool) -> None:
    assert fast_read_from({} if value is None else {FAST_READ_ENV: value}) is on


@pytest.mark.parametrize("value", ["", "yes", "true", " 1"])
def test_a_bad_fast_reading_switch_is_refused_by_name(value: str) -> None:
    with pytest.raises(ValueError, match=f"{FAST_READ_ENV} must be 1 .* or 0, not '{value}'"):
        fast_read_from({FAST_READ_ENV: value})


async def test_ask_answers_refuses_times_out_and_forgets(nats_server: EmbeddedNats) -> None:
    nc, responder = await nats.connect(nats_server.url), await nats_connect(nats_server.url)

    async def double(msg: Msg) -> None:
        if msg.data != b"silence":
            await msg.respond(msg.data * 2)

    await responder.subscribe("double", cb=double)
    await responder.flush()
    wire = Wire.of(nc)
    with pytest.raises(RuntimeError, match="ready"):
        wire.ask("double", b"x", 1)
    await wire.ready()
    answers = await asyncio.gather(*(wire.ask("double", b"%d" % i, 5) for i in range(20)))
    assert [a.data for a in answers] == [b"%d" % i * 2 for i in range(20)]
    with pytest.raises(nats.errors.NoRespondersError):
        await wire.ask("nobody.listens", b"x", 5)
    with pytest.raises(nats.errors.TimeoutError):
        await wire.ask("double", b"silence", 0.2)
    cancelled = wire.ask("double", b"silence", 30)
    cancelled.cancel()
    await asyncio.sleep(0)
    assert wire.waiting == 0  # nothing left behind by answers, refusals, timeouts or cancellations
    await nc.close()
    await responder.close()


async def test_closing_the_connection_fails_the_requests_that_wait_and_any_asked_after(
    nats_server: EmbeddedNats,
) -> None:
    nc, responder = await nats.connect(nats_server.url), await nats_connect(nats_server.url)
    heard = asyncio.Event()

    async def never_answer(msg: Msg) -> None:
        heard.set()

    await responder.subscribe("silent", cb=never_answer)
    await responder.flush()
    wire = Wire.of(nc)
    await wire.ready()
    waiting = wire.ask("silent", b"x", 10)  # a regression fails with TimeoutError
    await heard.wait()
    await nc.close()
    with pytest.raises(nats.errors.ConnectionClosedError):
        await waiting
    assert wire.waiting == 0
    with pytest.raises(nats.errors.ConnectionClosedError):
        wire.ask("silent", b"x", 60)
    await responder.close()


async def test_sending_while_disconnected_is_buffered_and_callbacks_survive_a_reconnect(tmp_path: Path) -> None:
    async with EmbeddedNats(tmp_path / "n") as server:
        nc = await nats.connect(server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.1)
        wire = Wire.of(nc)
        seen: list[bytes] = []
        await wire.subscribe("survives", lambda msg: seen.append(msg.data))
        await wire.subscribe("echo", lambda msg: wire.send_soon(msg.reply, msg.data))
        await wire.ready()
        await nc.flush()
        await server.stop()
        await assert_eventually(now(lambda: nc.is_connected), lambda up: not up, what="disconnected")
        assert not wire.send("survives", b"now")  # nothing written to a dead socket
        await wire.publish("survives", b"buffered")  # nats-py holds it until the connection is back
        asked = wire.ask("echo", b"asked while down", 30)  # waits on: the connection is down, not closed
        await server.start()
        await assert_eventually(now(lambda: seen), lambda s: s == [b"buffered"], within=20, what="buffered message")
        assert (await asked).data == b"asked while down"
        await wire.publish("survives", b"after")
        await assert_eventually(
            now(lambda: seen), lambda s: s == [b"buffered", b"after"], what="message after reconnect"
        )
        ahead: list[bool] = []
        await wire.subscribe("ahead", lambda msg: ahead.append(read_ahead()))
        await wire.flush()
        await wire.publish("ahead", b"")  # the new connection's reader reads ahead too
        await assert_eventually(now(lambda: ahead), lambda a: a == [True], what="a message read ahead")
        await nc.close()


async def test_held_messages_go_out_as_one_write_in_order_at_release_or_by_the_end_of_the_turn(
    nats_server: EmbeddedNats,
) -> None:
    nc, reader = await nats.connect(nats_server.url), await nats_connect(nats_server.url)
    got = await collect(reader, "held.>")
    wire = Wire.of(nc)
    writes: list[int] = []
    transport = nc._transport
    assert transport is not None
    write, writelines = transport.write, transport.writelines
    transport.write = lambda data: (writes.append(1), write(data))[1]  # type: ignore[method-assign]
    transport.writelines = lambda lines: (writes.append(len(lines)), writelines(lines))[1]  # type: ignore[method-assign]

    wire.hold()
    wire.send("held.1", b"1")
    await nc.publish("held.2", b"2")  # nats-py's own, held in order with the rest
    wire.send("held.3", b"3")
    assert writes == []
    wire.release()
    assert writes == [3]
    await assert_eventually(now(lambda: got), lambda g: g == [b"1", b"2", b"3"], what="released messages")

    wire.hold()
    wire.send("held.4", b"4")  # never released by hand: by the end of this turn
    await asyncio.sleep(0)
    assert writes == [3, 1]
    wire.hold()
    wire.send("held.5", b"5")
    await nc.flush()  # its PING goes after what is held: the server has it when flush() returns
    await reader.flush()
    await assert_eventually(now(lambda: got), lambda g: g[3:] == [b"4", b"5"], what="messages held then flushed")
    wire.hold()
    wire.send("held.6", b"6")
    await nc.close()  # what is held is written before the connection closes
    await assert_eventually(now(lambda: got), lambda g: g[5:] == [b"6"], what="message held at close")
    await reader.close()


async def test_a_request_that_nats_py_cannot_hold_while_disconnected_fails_at_once(tmp_path: Path) -> None:
    async with EmbeddedNats(tmp_path / "n") as server:
        nc = await nats.connect(server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.1, pending_size=256)
        wire = Wire.of(nc)
        await wire.ready()
        await server.stop()
        await assert_eventually(now(lambda: nc.is_connected), lambda up: not up, what="disconnected")
        held = wire.ask("anyone", b"small", 60)  # nats-py holds it for the reconnect
        too_much = wire.ask("anyone", b"x" * 512, 60)  # more than nats-py holds: a regression waits its 60 s
        with pytest.raises(nats.errors.OutboundBufferLimitError):
            await too_much
        assert not held.done() and wire.waiting == 1
        held.cancel()
        await server.start()  # (nats-py cannot close while down with messages held: it writes to the dead socket)
        await assert_eventually(now(lambda: nc.is_connected), lambda up: up, within=20, what="reconnected")
        await nc.close()


async def test_a_subscription_is_live_when_a_flush_returns(nats_server: EmbeddedNats) -> None:
    """nats-py writes a flush's PING ahead of the SUB it still holds; on a connection with a Wire the SUB goes
    first, so a message published right after the flush by someone else is delivered."""
    nc, other = await nats.connect(nats_server.url), await nats.connect(nats_server.url)
    Wire.of(nc)
    sender = Wire.of(other)
    missed = []
    for i in range(100):
        sub = await nc.subscribe(f"live.{i}")
        await nc.flush()
        assert sender.send(f"live.{i}", b"x")
        try:
            await sub.next_msg(timeout=2)
        except nats.errors.TimeoutError:
            missed.append(i)
        await sub.unsubscribe()
    assert missed == []
    await nc.close()
    await other.close()


async def test_store_settles_with_the_acknowledgement_or_the_error_jetstream_answered(
    nats_server: EmbeddedNats,
) -> None:
    nc = await nats.connect(nats_server.url)
    await nc.jetstream().add_stream(name="WIRE", subjects=["wire.>"], max_msg_size=256)
    wire = Wire.of(nc)
    await wire.ready()
    stored = await wire.store("wire.a", b"x" * 10, 5, headers={"Nats-Msg-Id": "one"})
    again = await wire.store("wire.a", b"x" * 10, 5, headers={"Nats-Msg-Id": "one"})
    too_big = await wire.store("wire.a", b"x" * 1000, 5)
    nowhere = await wire.store("nostream.a", b"x", 5)
    assert (await stored)["seq"] == 1
    assert (await again).get("duplicate") is True  # the header reached JetStream
    with pytest.raises(nats.js.errors.APIError, match="maximum"):
        await too_big
    with pytest.raises(nats.errors.NoRespondersError):
        await nowhere
    with pytest.raises(ValueError, match="line break"):
        wire.send("wire.a", b"x", headers={"Nats-Msg-Id": "a\r\nEvil: 1"})
    await nc.close()


async def test_a_run_that_lost_an_event_says_so_at_every_later_wait(nats_server: EmbeddedNats) -> None:
    """A status waits for the events before it (agent.worker): an event lost before it must still fail the run
    at its end, however many waits came between."""
    nc = await nats.connect(nats_server.url)
    await nc.jetstream().add_stream(name="RUN", subjects=["run.>"], max_msg_size=256)
    wire = Wire.of(nc)
    await wire.ready()
    storing = Storing()
    storing.add(await wire.store("run.a", b"x" * 1000, 5))  # refused: too big for the stream
    lost = await storing.stored()
    assert isinstance(lost, nats.js.errors.APIError)
    storing.add(await wire.store("run.a", b"fine", 5))
    assert await storing.stored() is lost
    await nc.close()


async def test_a_request_polls_for_its_answer_until_it_comes_or_for_the_window_only(nats_server: EmbeddedNats) -> None:
    """Polling keeps a quick answer from waiting for a wake-up (agent.wire); a process must not burn its CPU on
    after the answer came, nor for longer than the window while it waits for a slow one (a model call)."""
    nc, responder = await nats.connect(nats_server.url), await nats_connect(nats_server.url)

    async def answer(msg: Msg) -> None:
        if msg.data != b"silence":
            await msg.respond(msg.data)

    await responder.subscribe("echo", cb=answer)
    await responder.flush()
    wire = Wire.of(nc)
    await wire.ready()
    wire.spin_s = 3600.0  # only the answer can stop it
    assert not wire.spinning
    assert (await wire.ask("echo", b"quick", 5)).data == b"quick"
    await assert_eventually(now(lambda: wire.spinning), lambda spinning: not spinning, what="polling to stop")

    wire.spin_s = 0.02
    slow = wire.ask("echo", b"silence", 30)
    assert wire.spinning
    await asyncio.sleep(0.1)  # the event loop has turned after the window
    assert not wire.spinning and not slow.done()  # it sleeps now, and the request still waits for its answer
    assert (await wire.ask("echo", b"later", 5)).data == b"later"  # polling again for the next request
    slow.cancel()
    await assert_eventually(now(lambda: wire.spinning), lambda spinning: not spinning, what="polling to stop")

    unawaited = await wire.store("echo", b"silence", 30)  # an event stored without waiting: nobody waits here
    assert not wire.spinning
    unawaited.cancel()

    wire.spin_s = 0.0  # CARAVAN_SPIN_US=0: never
    waiting = wire.ask("echo", b"silence", 30)
    assert not wire.spinning
    waiting.cancel()
    await nc.close()
    await responder.close()


@pytest.mark.parametrize(
    ("value", "seconds"), [(None, DEFAULT_SPIN_US / 1e6), ("", DEFAULT_SPIN_US / 1e6), ("0", 0.0), ("250", 0.00025)]
)
def test_the_polling_window_comes_from_the_environment(value: str | None, seconds: float) -> None:
    env = {} if value is None else {SPIN_ENV: value}
    assert spin_s_from(env) == seconds


@pytest.mark.parametrize("value", ["abc", "-1", "nan", "1e7", "inf"])
def test_a_bad_polling_window_is_refused_by_name(value: str) -> None:
    with pytest.raises(ValueError, match=f"{SPIN_ENV} must be a number of microseconds .* not '{value}'"):
        spin_s_from({SPIN_ENV: value})


async def test_a_flush_that_gives_up_on_a_stalled_server_leaves_the_connection_reading(
    nats_server: EmbeddedNats,
) -> None:
    """Wire.flush times out (or is cancelled) as nats-py's flush does, but the server's late answers find their
    waiters as they left them: nats-py's flush cancels its own, and the late answer stops its read loop for good."""
    nc, reader = await nats.connect(nats_server.url), await nats_connect(nats_server.url)
    got = await collect(reader, "after")
    wire = Wire.of(nc)
    wire.send("after", b"1")
    await wire.flush(within_s=5)  # the server has what was sent before it: a round trip
    with stalled(nats_server.pid):
        with pytest.raises(nats.errors.FlushTimeoutError):
            await wire.flush(within_s=0.2)
        cancelled = asyncio.ensure_future(wire.flush())
        await asyncio.sleep(0.2)
        cancelled.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await cancelled
    await wire.flush(within_s=5)  # answered after the two late answers: the read loop took them
    await nc.publish("after", b"2")
    await reader.flush()
    await assert_eventually(now(lambda: got), lambda g: g == [b"1", b"2"], what="both messages")
    await nc.close()
    with pytest.raises(nats.errors.ConnectionClosedError):
        await wire.flush()
    await reader.close()
