"""The NATS agent runtime between two runtimes (as two processes would use it): routing, cancellation, the codec."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import nats
import pytest
from autogen_agentchat.messages import TextMessage
from autogen_core import (
    AgentId,
    CancellationToken,
    MessageContext,
    RoutedAgent,
    TopicId,
    TypePrefixSubscription,
    TypeSubscription,
    event,
    rpc,
    try_get_known_serializers_for_type,
)
from pydantic import BaseModel

from agent.runtime import NatsAgentRuntime, RemoteHandlerError
from agent.serialization import MessageCodec
from agent.wire import Wire
from control.natsserver import EmbeddedNats
from tests.support.helpers import FlushCounter, assert_eventually, now, stalled

NS = "caravan.rt.cu-000000000001.rn-000000000001"


@dataclass
class Note:
    text: str


@dataclass
class Wait:
    seconds: float


@dataclass
class Big:
    """Asks for a Note of this many characters."""

    size: int


class Loose(BaseModel):
    """A field of no declared type: a message in it is rebuilt, as before the codec's fast path."""

    value: Any


class Recorder(RoutedAgent):
    def __init__(self) -> None:
        super().__init__("records what reaches it")
        self.seen: list[tuple[str, str | None]] = []
        self.cancelled = asyncio.Event()
        self.waiting = asyncio.Event()

    @event
    async def on_note(self, message: Note, ctx: MessageContext) -> None:
        self.seen.append((message.text, ctx.topic_id.type if ctx.topic_id else None))

    @rpc
    async def on_wait(self, message: Wait, ctx: MessageContext) -> Note:
        waiting = asyncio.ensure_future(asyncio.sleep(message.seconds))
        ctx.cancellation_token.link_future(waiting)
        self.waiting.set()
        try:
            await waiting
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return Note("done")

    @rpc
    async def on_big(self, message: Big, ctx: MessageContext) -> Note:
        return Note("x" * message.size)


@contextlib.asynccontextmanager
async def two_runtimes(
    url: str, rpc_timeout: float = 900.0
) -> AsyncIterator[tuple[NatsAgentRuntime, NatsAgentRuntime, Recorder]]:
    """A runtime that serves a Recorder (type ``rec``, with AgentChat's default direct-message subscription) and
    one that talks to it."""
    nc_a, nc_b = await nats.connect(url), await nats.connect(url)
    serving, calling = NatsAgentRuntime(nc_a, NS), NatsAgentRuntime(nc_b, NS, rpc_timeout=rpc_timeout)
    recorder = Recorder()
    await Recorder.register(serving, "rec", lambda: recorder)  # type: ignore[arg-type]
    await serving.add_subscription(TypeSubscription(topic_type="notes", agent_type="rec"))
    for runtime in (serving, calling):
        runtime.add_message_serializer([*_serializers(Note), *_serializers(Wait), *_serializers(Big)])
        await runtime.start()
    yield serving, calling, recorder
    for runtime in (calling, serving):
        await runtime.stop()
    await nc_a.close()
    await nc_b.close()


@pytest.fixture
async def pair(nats_server: EmbeddedNats) -> AsyncIterator[tuple[NatsAgentRuntime, NatsAgentRuntime, Recorder]]:
    async with two_runtimes(nats_server.url) as runtimes:
        yield runtimes


def _serializers(cls: type) -> list[Any]:
    return list(try_get_known_serializers_for_type(cls))


async def _marked(calling: NatsAgentRuntime, recorder: Recorder, mark: str) -> None:
    """Publish ``mark`` on a subscribed topic after what came before and wait for it: from one connection to one
    agent, messages arrive in order, so whatever was published earlier and not seen by now never will be."""
    await calling.publish_message(Note(mark), TopicId("notes", "default"))
    await assert_eventually(
        now(lambda: list(recorder.seen)), lambda seen: (mark, "notes") in seen, within=10, what=mark
    )
    recorder.seen.remove((mark, "notes"))


async def test_each_subscription_gets_a_message_once_and_direct_topics_reach_only_their_agent(
    pair: tuple[NatsAgentRuntime, NatsAgentRuntime, Recorder],
) -> None:
    _, calling, recorder = pair
    await calling.publish_message(Note("typed"), TopicId("notes", "default"))
    await calling.publish_message(Note("direct"), TopicId("rec:", "default"))
    await calling.publish_message(Note("direct, longer"), TopicId("rec:a:b", "default"))
    await calling.publish_message(Note("elsewhere"), TopicId("other:", "default"))
    await calling.publish_message(Note("unheard"), TopicId("unheard", "default"))
    await _marked(calling, recorder, "end")
    assert sorted(recorder.seen) == [("direct", "rec:"), ("direct, longer", "rec:a:b"), ("typed", "notes")]


async def test_a_subscription_added_late_is_routed_and_one_that_is_removed_is_not(
    pair: tuple[NatsAgentRuntime, NatsAgentRuntime, Recorder],
) -> None:
    serving, calling, recorder = pair
    await calling.publish_message(Note("before"), TopicId("later", "default"))
    await _marked(calling, recorder, "before is done")
    late = TypePrefixSubscription(topic_type_prefix="lat", agent_type="rec")
    await serving.add_subscription(late)
    await calling.publish_message(Note("after"), TopicId("later", "default"))
    await _marked(calling, recorder, "after is done")
    await serving.remove_subscription(late.id)
    await calling.publish_message(Note("removed"), TopicId("later", "default"))
    await _marked(calling, recorder, "removed is done")
    assert recorder.seen == [("after", "later")]


async def test_subscriptions_on_subjects_listened_ahead_wait_no_round_trip(nats_server: EmbeddedNats) -> None:
    """A started runtime waits a round trip to the server for each subscription that needs a new NATS one; on a
    subject it listens on ahead (as a team's manager does), none. Before the subscription, a message there reaches
    nobody; after it, it is routed."""
    nc_a, nc_b = await nats.connect(nats_server.url), await nats.connect(nats_server.url)
    serving, calling = NatsAgentRuntime(nc_a, NS), NatsAgentRuntime(nc_b, NS)
    recorder = Recorder()
    serving.listen_ahead(["ahead"], direct_to=["rec"])
    for runtime in (serving, calling):
        runtime.add_message_serializer(_serializers(Note))
        await runtime.start()
    with pytest.raises(RuntimeError, match="not yet started"):
        serving.listen_ahead(["late"])
    marked = asyncio.get_running_loop().create_future()
    await Wire.of(nc_a).subscribe("test.mark", lambda msg: marked.set_result(None))
    await nc_a.flush()
    flushes = FlushCounter(nc_a)
    await calling.publish_message(Note("too early"), TopicId("ahead", "default"))
    await nc_b.publish("test.mark", b"")  # after it on one connection: once the mark is here, so is "too early"
    await asyncio.wait_for(marked, 10)
    await Recorder.register(serving, "rec", lambda: recorder)  # type: ignore[arg-type]  (direct messages: "rec:")
    await serving.add_subscription(TypeSubscription(topic_type="ahead", agent_type="rec"))
    assert flushes.count == 0
    await serving.add_subscription(TypeSubscription(topic_type="notes", agent_type="rec"))
    assert flushes.count == 1  # not listened on ahead: one round trip
    await calling.publish_message(Note("ahead"), TopicId("ahead", "default"))
    await calling.publish_message(Note("direct"), TopicId("rec:", "default"))
    await _marked(calling, recorder, "end")
    assert recorder.seen == [("ahead", "ahead"), ("direct", "rec:")]
    for runtime in (calling, serving):
        await runtime.stop()
    await nc_a.close()
    await nc_b.close()


async def test_a_message_that_implies_another_goes_once_and_delivers_the_other_first(
    pair: tuple[NatsAgentRuntime, NatsAgentRuntime, Recorder],
) -> None:
    """As a team member's answer implies the output's message: the receiving process derives the implied one for
    its subscribers of that topic, before the message itself; a sender that cannot derive it sends nothing."""
    serving, calling, recorder = pair
    await serving.add_subscription(TypeSubscription(topic_type="echoes", agent_type="rec"))
    notes, echoes = TopicId("notes", "default"), TopicId("echoes", "default")
    with pytest.raises(LookupError, match="derive"):
        await calling.publish_message(Note("underived"), notes, implied=echoes)
    for runtime in (serving, calling):
        runtime.derive(Note, lambda note: Note(f"echo of {note.text}"))
    await calling.publish_message(Note("said"), notes, implied=echoes)
    await calling.publish_message(Note("plain"), notes)
    await _marked(calling, recorder, "end")
    assert recorder.seen == [("echo of said", "echoes"), ("said", "notes"), ("plain", "notes")]


async def test_cancelling_a_token_cancels_the_remote_handler(
    pair: tuple[NatsAgentRuntime, NatsAgentRuntime, Recorder],
) -> None:
    _, calling, recorder = pair
    token = CancellationToken()
    call = asyncio.ensure_future(calling.send_message(Wait(30), AgentId("rec", "default"), cancellation_token=token))
    await asyncio.wait_for(recorder.waiting.wait(), 5)
    token.cancel()
    await asyncio.wait_for(recorder.cancelled.wait(), 5)
    with pytest.raises(asyncio.CancelledError):
        await call


@pytest.mark.parametrize("where", ["from another process", "in the same process"])
async def test_cancel_all_ends_a_send_that_has_no_token(
    pair: tuple[NatsAgentRuntime, NatsAgentRuntime, Recorder], where: str
) -> None:
    serving, calling, recorder = pair
    if where == "in the same process":
        calling = serving
    call = asyncio.ensure_future(calling.send_message(Wait(30), AgentId("rec", "default")))
    await asyncio.wait_for(recorder.waiting.wait(), 5)
    await calling.cancel_all()
    await asyncio.wait_for(recorder.cancelled.wait(), 5)
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(call, 5)


async def test_cancellation_scopes_go_with_their_messages(
    pair: tuple[NatsAgentRuntime, NatsAgentRuntime, Recorder],
) -> None:
    serving, calling, recorder = pair
    for _ in range(50):
        assert await calling.send_message(Wait(0), AgentId("rec", "default")) == Note("done")
        await calling.publish_message(Note("n"), TopicId("notes", "default"))
    await _marked(calling, recorder, "all handled")
    assert len(recorder.seen) == 50
    gc.collect()
    assert len(calling._scopes) < 5 and len(serving._scopes) < 5


async def test_an_answer_too_big_for_a_nats_message_fails_the_call_at_once(nats_server: EmbeddedNats) -> None:
    async with two_runtimes(nats_server.url, rpc_timeout=10) as (serving, calling, _):  # a regression: TimeoutError
        limit = serving._nc.max_payload
        with pytest.raises(RemoteHandlerError, match=rf"MaxPayloadError: the answer is \d+ bytes, .* of {limit}"):
            await calling.send_message(Big(limit), AgentId("rec", "default"))
        assert await calling.send_message(Big(3), AgentId("rec", "default")) == Note("xxx")  # and it serves on


class Pair(BaseModel):
    """Plain, though it names one type twice."""

    first: Note
    second: Note | None = None


def test_the_codec_reads_back_agentchat_messages_and_plain_types() -> None:
    codec = MessageCodec()
    message = TextMessage(source="alpha", content="hello")
    for value in (Note("x"), Pair(first=Note("a"), second=Note("b")), Loose(value=message), Loose(value={"p": 1})):
        name, data = codec.encode(value)
        assert codec.decode(name, data) == value
    name, data = codec.encode(Loose(value=message))
    assert isinstance(codec.decode(name, data).value, TextMessage)


async def test_a_start_that_meets_a_stalled_server_leaves_its_connection_reading(nats_server: EmbeddedNats) -> None:
    """A runtime's start waits a round trip for its subscriptions. One that gives up on a stalled server (here
    cancelled, as a team run that is cancelled while it starts; at its timeout likewise) must not leave a waiter for
    the server's late answer behind: nats-py's flush() cancels its own, and the late answer then stopped the
    connection's read loop for good (the connection says it is up, and hears nothing)."""
    nc = await nats.connect(nats_server.url)
    runtime = NatsAgentRuntime(nc, NS)
    with stalled(nats_server.pid):
        start = asyncio.ensure_future(runtime.start())
        await asyncio.sleep(0.3)
        assert not start.done()  # waiting for the server
        start.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await start
    await nc.request("$JS.API.INFO", b"", timeout=5)  # the connection still hears the server
    await runtime.stop()
    await nc.close()
