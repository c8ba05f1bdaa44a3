"""The team's manager, as the control plane runs it (control.teams.build), with its members in team hosts on
connections of their own: it polls for the answer of the member it asked to speak, its first run waits no
round trip to the server for its subscriptions, and a member's answer implies the message for the team's output
(sent once), unless the manager is an older one."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any

import nats
import pytest
from autogen_agentchat.agents import AssistantAgent
from autogen_agentchat.base import Response
from autogen_agentchat.conditions import MaxMessageTermination
from autogen_agentchat.messages import BaseAgentEvent, BaseChatMessage
from autogen_agentchat.teams import BaseGroupChat, RoundRobinGroupChat, SelectorGroupChat, Swarm
from autogen_agentchat.teams._group_chat._events import (
    GroupChatAgentResponse,
    GroupChatError,
    GroupChatMessage,
    GroupChatRequestPublish,
)
from autogen_core import AgentId, BaseAgent, CancellationToken, MessageContext, TopicId, TypeSubscription
from nats.aio.msg import Msg

from agent import models
from agent.models import create_model_client
from agent.protocol import LOCAL_MODEL_URL_ENV, AgentDefinition, ModelConfig
from agent.runtime import NatsAgentRuntime
from agent.teamhost import TeamHost, _Container, _StateSender
from agent.teamprotocol import (
    MODEL_POSITION,
    STATE_BASE_HEADER,
    STATE_MEMBER_HEADER,
    MemberJoin,
    MemberRefused,
    answer_output,
    join_answer,
    join_subject,
    run_namespace,
)
from agent.wire import Wire
from control.natsserver import EmbeddedNats
from control.teams.build import build_team
from control.teams.models import SelectorSpec, Team, Termination
from tests.support.helpers import FlushCounter, assert_eventually, chat_completions_server, join_members, now

CUSTOMER = "cu-0000000000aa"
NAMES = ("alice", "bob")


def _member(i: int, name: str) -> AgentDefinition:
    model = ModelConfig(provider="replay", name="m", responses=[f"{name} {n}" for n in range(9)], delay_ms=50)
    return AgentDefinition(
        agent_id=f"ag-00000000000{i}", customer_id=CUSTOMER, name=name, system_message="", model=model
    )


def _round_robin(names: Sequence[str], max_messages: int) -> tuple[list[AgentDefinition], Team]:
    """Members of these names on scripted models, and their round-robin team of at most so many messages."""
    members = [_member(i, name) for i, name in enumerate(names)]
    return members, _team(members, "round_robin", max_messages)


def _team(members: list[AgentDefinition], mode: str, max_messages: int, **more: Any) -> Team:
    """The team of these members in ``mode``, of at most so many messages; ``more``: its other fields."""
    return Team(
        id="tm-0000000000aa",
        customer_id=CUSTOMER,
        name="team",
        members=[m.agent_id for m in members],
        mode=mode,
        termination=Termination(max_messages=max_messages),
        **more,
    )


@contextlib.asynccontextmanager
async def _hosts(url: str, members: list[AgentDefinition]) -> AsyncIterator[None]:
    async with contextlib.AsyncExitStack() as stack:
        for definition in members:
            nc = await nats.connect(url, no_echo=True)  # as an agent process connects
            stack.push_async_callback(nc.close)
            host = TeamHost(nc, definition, f"host-{definition.name}")
            await host.start()
            stack.push_async_callback(host.stop)
        yield


async def test_a_member_on_a_served_model_calls_it_with_one_client_run_after_run(
    nats_server: EmbeddedNats, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A member's model client is its agent's, not a run's: the next run calls the model on the connection the last
    one used (to a hosted provider: no new connection and TLS handshake, nor ~20 ms making a client, per run), and
    a run's end does not close it. A scripted model still gets a client of its own per run (it starts afresh)."""
    async with chat_completions_server("alice here") as (port, served):
        monkeypatch.setenv(LOCAL_MODEL_URL_ENV, f"http://127.0.0.1:{port}/v1")
        alice = AgentDefinition(
            agent_id="ag-00000000000a",
            customer_id=CUSTOMER,
            name="alice",
            system_message="",
            model=ModelConfig(provider="local"),
        )
        bob = _member(1, "bob")
        spec = _team([alice, bob], "round_robin", 3)
        nc = await nats.connect(nats_server.url)
        async with _hosts(nats_server.url, [alice, bob]):
            for run_id in ("rn-0000000000c1", "rn-0000000000c2"):
                runtime = NatsAgentRuntime(nc, run_namespace(CUSTOMER, run_id))
                chat = build_team(spec, {m.agent_id: m for m in (alice, bob)}, runtime, run_id)
                await runtime.start()
                await join_members(nc, CUSTOMER, run_id, [alice.agent_id, bob.agent_id])
                result = await chat.run(task="take turns")
                assert [(m.source, m.to_text()) for m in result.messages] == [
                    ("user", "take turns"),
                    ("alice", "alice here"),
                    ("bob", "bob 0"),  # each run's scripted bob starts from its first answer
                ]
                await runtime.stop()
        await nc.close()
    assert served == [2]  # both runs' calls on one connection


async def test_the_manager_sleeps_until_the_member_it_asked_answers(nats_server: EmbeddedNats) -> None:
    """The answer comes on the group's subject, not as the answer to a request: the manager does not poll for it,
    however long its connection's window for requests (its polling made a team's run slower once messages were
    read ahead: README)."""
    members, spec = _round_robin(NAMES, 5)
    nc = await nats.connect(nats_server.url)
    wire = Wire.of(nc)
    wire.spin_s = 3.0
    run_id = "rn-0000000000aa"
    runtime = NatsAgentRuntime(nc, run_namespace(CUSTOMER, run_id))
    asked: list[tuple[str, bool]] = []  # each request to speak as this connection sees it, and whether it polled

    def on_request(msg: Msg) -> None:  # called as the request comes back to this connection
        asked.append((msg.subject.rsplit(".", 1)[-1], wire.spinning))

    for name in NAMES:
        await wire.subscribe(f"{runtime.namespace}.t.{name}_{run_id}", on_request)
    async with _hosts(nats_server.url, members):
        chat = build_team(spec, {m.agent_id: m for m in members}, runtime, run_id)
        await runtime.start()
        await join_members(nc, CUSTOMER, run_id, [m.agent_id for m in members])
        flushes = FlushCounter(nc)
        result = await chat.run(task="take turns")
        assert flushes.count == 0  # the manager's topics were subscribed when the runtime started
        assert [m.source for m in result.messages] == ["user", "alice", "bob", "alice", "bob"]
        assert asked == [(f"{n}_{run_id}", False) for n in ("alice", "bob", "alice", "bob")]
        await runtime.stop()
    await nc.close()


@pytest.mark.parametrize(
    "terms",
    [
        {},
        {"output_implied": False, "state_deltas": False},
        {"states": False},
        {"output_implied": False, "states": False, "rejoin": True},
        {"output_implied": False, "state_deltas": False, "rejoin": True},
    ],
    ids=[
        "as the runner joins",
        "an older manager",
        "a manager keeping no checkpoints",
        "a new attempt's manager keeping none",
        "a new attempt's older manager",
    ],
)
async def test_what_members_send_follows_the_managers_join(nats_server: EmbeddedNats, terms: dict[str, bool]) -> None:
    """AgentChat's container publishes each answer twice (for the team's output, then for the group); a member
    joined by a manager that derives the first from the second sends it once. It sends its state after each
    turn, for the checkpoints, unless the manager keeps none: whole the first time, then as deltas to the one
    before, unless the manager takes only whole states. The transcript is the same. A member follows the join
    of a new attempt's manager (which may be an older one) rather than the first."""
    terms = dict(terms)
    rejoin = terms.pop("rejoin", False)
    implied, states = terms.get("output_implied", True), terms.get("states", True)
    deltas = terms.get("state_deltas", True)
    members, spec = _round_robin(NAMES, 5)
    run_id = "rn-0000000000ab"
    nc, watcher = await nats.connect(nats_server.url), await nats.connect(nats_server.url)
    runtime = NatsAgentRuntime(nc, run_namespace(CUSTOMER, run_id))
    outputs: list[str] = []  # who sent each message on the output's subject, when a member did
    states_from: list[tuple[str, bool]] = []  # whose state each message on x.state was, and whether a delta

    async def on_output(msg: Msg) -> None:
        sender = (json.loads(msg.data.partition(b"\n")[0])["sn"] or "").split("_", 1)[0]
        if sender in NAMES:  # (the manager publishes the task and the termination there)
            outputs.append(sender)

    async def on_state(msg: Msg) -> None:
        headers = msg.headers or {}
        states_from.append((headers[STATE_MEMBER_HEADER], STATE_BASE_HEADER in headers))

    await watcher.subscribe(f"{runtime.namespace}.t.output_topic_{run_id}", cb=on_output)
    await watcher.subscribe(f"{runtime.namespace}.x.state", cb=on_state)
    await watcher.flush()
    async with _hosts(nats_server.url, members):
        chat = build_team(spec, {m.agent_id: m for m in members}, runtime, run_id)
        await runtime.start()
        if rejoin:  # the first attempt's manager joined as the runner does
            await join_members(nc, CUSTOMER, run_id, [m.agent_id for m in members])
        await join_members(nc, CUSTOMER, run_id, [m.agent_id for m in members], **terms)
        result = await chat.run(task="take turns")
        await runtime.stop()
    await watcher.flush()  # (everything sent before the run ended has reached the watcher)
    assert [(m.source, m.to_text()) for m in result.messages] == [
        ("user", "take turns"),
        ("alice", "alice 0"),
        ("bob", "bob 0"),
        ("alice", "alice 1"),
        ("bob", "bob 1"),
    ]
    turns = ["alice", "bob", "alice", "bob"]
    assert outputs == ([] if implied else turns)
    delta = [False, False, deltas, deltas]  # each member's second state goes as a delta to its first
    assert states_from == (list(zip(turns, delta, strict=True)) if states else [])
    await watcher.close()
    await nc.close()


class _FailsAfterItsAnswer(AssistantAgent):
    async def on_messages_stream(
        self, messages: Sequence[BaseChatMessage], cancellation_token: CancellationToken
    ) -> AsyncGenerator[BaseAgentEvent | BaseChatMessage | Response, None]:
        async for item in super().on_messages_stream(messages, cancellation_token):
            yield item
        raise RuntimeError("failed after its answer")


class _StallsAfterItsAnswer(AssistantAgent):
    stalled = asyncio.Event()

    async def on_messages_stream(
        self, messages: Sequence[BaseChatMessage], cancellation_token: CancellationToken
    ) -> AsyncGenerator[BaseAgentEvent | BaseChatMessage | Response, None]:
        async for item in super().on_messages_stream(messages, cancellation_token):
            yield item
        self.stalled.set()
        stalling = asyncio.ensure_future(asyncio.sleep(60))
        cancellation_token.link_future(stalling)  # as a model call in flight is cancelled
        await stalling


_ENDINGS = {"answers": AssistantAgent, "fails": _FailsAfterItsAnswer, "is cancelled": _StallsAfterItsAnswer}


class _Hears(BaseAgent):
    def __init__(self) -> None:
        super().__init__("hears the output and the group")
        self.heard: list[tuple[str, Any]] = []

    async def on_message_impl(self, message: Any, ctx: MessageContext) -> None:
        assert ctx.topic_id is not None
        self.heard.append((ctx.topic_id.type.split("_", 1)[0], message))


@pytest.mark.parametrize("turn", list(_ENDINGS))
async def test_an_outputs_message_kept_for_the_answer_goes_alone_when_no_answer_follows(
    nats_server: EmbeddedNats, turn: str
) -> None:
    """A member keeps the output's message of its answer for the answer to imply; a turn that fails after it
    (AgentChat then publishes an error for the group, not the answer) still sends it, first, and so does one
    cancelled after it."""
    key = "rn-0000000000ac"
    namespace = run_namespace(CUSTOMER, key)
    nc_member, nc_manager = await nats.connect(nats_server.url, no_echo=True), await nats.connect(nats_server.url)
    member, manager = NatsAgentRuntime(nc_member, namespace), NatsAgentRuntime(nc_manager, namespace)
    model = create_model_client(ModelConfig(provider="replay", name="m", responses=["the answer"]))
    agent = _ENDINGS[turn]("alice", model_client=model)

    async def state_sent(body: bytes, headers: dict[str, str]) -> bool:
        return True

    sender = _StateSender("alice", state_sent, lambda: True)
    join = MemberJoin(
        run_id=key,
        task_id="tk-0000000000ac",
        customer_id=CUSTOMER,
        agent_id="ag-0000000000ac",
        team_key=key,
        output_implied=True,
    )
    await member.register_factory(f"alice_{key}", lambda: _Container(key, agent, model, sender, lambda: join))
    for topic in (f"alice_{key}", f"group_topic_{key}"):
        await member.add_subscription(TypeSubscription(topic_type=topic, agent_type=f"alice_{key}"))
    hears = _Hears()
    await manager.register_agent_instance(hears, AgentId("hears", "default"))
    for topic in (f"output_topic_{key}", f"group_topic_{key}"):
        await manager.add_subscription(TypeSubscription(topic_type=topic, agent_type="hears"))
    for runtime in (member, manager):
        runtime.derive(GroupChatAgentResponse, answer_output)
        await runtime.start()
    await manager.publish_message(GroupChatRequestPublish(), TopicId(f"alice_{key}", "default"))
    if turn == "is cancelled":
        await asyncio.wait_for(_StallsAfterItsAnswer.stalled.wait(), 10)
        await manager.cancel_all()
    heard = 1 if turn == "is cancelled" else 2
    await assert_eventually(now(lambda: len(hears.heard)), lambda n: n == heard, what="the turn's messages")
    where, output = hears.heard[0]
    assert where == "output"
    assert isinstance(output, GroupChatMessage) and output.message.to_text() == "the answer"
    if turn == "fails":
        (group, answer) = hears.heard[1]
        assert group == "group"
        assert isinstance(answer, GroupChatError) and answer.error.error_message == "failed after its answer"
    elif turn == "answers":
        (group, answer) = hears.heard[1]
        assert group == "group"
        assert isinstance(answer, GroupChatAgentResponse) and answer.response.chat_message == output.message
    for runtime in (member, manager):
        await runtime.stop()
    await nc_member.close()
    await nc_manager.close()


def _comparable(state: Any) -> Any:
    """A saved team state without what differs between two runs of the same script (ids, a tool call's too, times)
    and what only Caravan's members add to it (the scripted model's place)."""
    if isinstance(state, dict):
        dropped = ("id", "call_id", "created_at", MODEL_POSITION)
        return {key: _comparable(value) for key, value in state.items() if key not in dropped}
    if isinstance(state, list):
        return [_comparable(item) for item in state]
    return state


def _said(messages: Sequence[BaseAgentEvent | BaseChatMessage]) -> list[tuple[str, str, str]]:
    """Who said what, of which type; a tool call's id (a fresh one in each run) left out."""
    return [(m.source, type(m).__name__, re.sub(r"call_[0-9a-f]+", "call", m.to_text())) for m in messages]


def _transfer(to: str) -> dict[str, Any]:
    return {"tool": f"transfer_to_{to}", "arguments": {}}


def _parity_team(mode: str) -> tuple[list[AgentDefinition], Team, ModelConfig | None, dict[str, list[str]]]:
    """Three members on scripted models, and their team of at most 8 messages in ``mode``: its members, its spec,
    the selector's model (selector) and whom each hands off to, by name (swarm)."""
    names = ("alice", "bob", "carol")
    if mode == "swarm":  # each says something, then hands the turn on: alice, bob, carol, alice, ...
        after = dict(zip(names, names[1:] + names[:1], strict=True))
        scripts = {n: [x for i in range(3) for x in (f"{n} {i}", _transfer(after[n]))] for n in names}
        members = [
            AgentDefinition(
                agent_id=f"ag-00000000000{i}",
                customer_id=CUSTOMER,
                name=n,
                system_message="",
                model=ModelConfig(provider="replay", name="m", responses=scripts[n]),
            )
            for i, n in enumerate(names)
        ]
        handoffs = {n: [after[n]] for n in names}
    else:
        members, handoffs = [_member(i, n) for i, n in enumerate(names)], {}
    ids = {m.name: m.agent_id for m in members}
    selector = None
    if mode == "selector":  # never the same speaker twice in a row (AgentChat's default)
        selector = ModelConfig(
            provider="replay", name="s", responses=["carol", "alice", "carol", "bob", "alice", "bob", "carol"]
        )
    spec = _team(
        members,
        mode,
        8,
        selector=SelectorSpec(model=selector) if selector else None,
        handoffs={ids[n]: [ids[t] for t in targets] for n, targets in handoffs.items()},
    )
    return members, spec, selector, handoffs


@pytest.mark.parametrize("mode", ["round_robin", "selector", "swarm"])
async def test_every_members_context_and_buffer_end_as_in_agentchats_own_team(
    nats_server: EmbeddedNats, mode: str
) -> None:
    """Beyond the transcript (the scripted model answers whatever it is told): each member's model context and
    message buffer, saved through the runtime once the run is over, equal those of AgentChat's team in one
    process, in each mode: the tool calls and handoffs of a swarm's members among them."""
    members, spec, selector, handoffs = _parity_team(mode)
    run_id = "rn-0000000000ad"
    nc = await nats.connect(nats_server.url)
    runtime = NatsAgentRuntime(nc, run_namespace(CUSTOMER, run_id))
    by_id = {m.agent_id: m for m in members}
    async with _hosts(nats_server.url, members):
        chat = build_team(spec, by_id, runtime, run_id, create_model_client(selector) if selector else None)
        await runtime.start()
        await join_members(
            nc, CUSTOMER, run_id, by_id, handoffs={m.agent_id: handoffs.get(m.name, []) for m in members}
        )
        distributed = await chat.run(task="take turns")
        saved = await chat.save_state()
        await runtime.stop()
    await nc.close()
    local_members = [
        AssistantAgent(
            m.name, model_client=create_model_client(m.model), system_message=None, handoffs=handoffs.get(m.name)
        )
        for m in members
    ]
    termination = MaxMessageTermination(8)
    local: BaseGroupChat
    if mode == "round_robin":
        local = RoundRobinGroupChat(local_members, termination_condition=termination)
    elif mode == "selector":
        assert selector is not None
        local = SelectorGroupChat(local_members, create_model_client(selector), termination_condition=termination)
    else:
        local = Swarm(local_members, termination_condition=termination)
    alone = await local.run(task="take turns")
    assert _said(distributed.messages) == _said(alone.messages)
    assert distributed.stop_reason == alone.stop_reason
    if mode == "swarm":
        assert sum(type(m).__name__ == "HandoffMessage" for m in distributed.messages) >= 3
    local_saved = await local.save_state()
    for m in members:  # (the states AgentChat saves, member by member)
        assert _comparable(saved["agent_states"][m.name]) == _comparable(local_saved["agent_states"][m.name]), m.name


async def test_a_member_that_cannot_take_part_refuses_and_keeps_nothing_of_the_run(
    nats_server: EmbeddedNats, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replica whose setup of a run fails part-way (here its last subscription, once its runtime has started)
    answers the join with the reason, and keeps nothing of the run: no subscription left on its connection, its
    model client closed. The join that comes again (a new attempt) sets the run up afresh, and the team runs."""
    members, spec = _round_robin(NAMES, 4)
    alice, bob = members
    made: list[Any] = []
    closed: list[Any] = []

    def recording(config: ModelConfig, local: Any = None) -> Any:  # alice's model clients
        client = create_model_client(config, local)
        if config != alice.model:
            return client
        close = client.close

        async def closing() -> None:
            closed.append(client)
            await close()

        client.close = closing  # type: ignore[method-assign]
        made.append(client)
        return client

    monkeypatch.setattr(models, "create_model_client", recording)
    run_id = "rn-0000000000bb"
    nc = await nats.connect(nats_server.url)
    hosted = await nats.connect(nats_server.url, no_echo=True)
    host = TeamHost(hosted, alice, "host-alice")
    await host.start()
    subscribe = hosted.subscribe

    async def refusing(subject: str, *args: Any, **kwargs: Any) -> Any:
        if subject.endswith(".x.alive"):
            raise nats.errors.ConnectionClosedError
        return await subscribe(subject, *args, **kwargs)

    monkeypatch.setattr(hosted, "subscribe", refusing)
    join = MemberJoin(
        run_id=run_id, task_id="tk-000000000000", customer_id=CUSTOMER, agent_id=alice.agent_id, team_key=run_id
    )
    asked = await nc.request(join_subject(CUSTOMER, alice.agent_id), join.model_dump_json().encode(), timeout=10)
    answer = join_answer(asked.data)
    assert isinstance(answer, MemberRefused), answer
    assert answer.refused == "ConnectionClosedError: nats: connection closed", answer.refused
    left = {sub.subject for sub in hosted._subs.values()}
    assert left == {join_subject(CUSTOMER, alice.agent_id), f"{Wire.of(hosted)._inbox}*"}  # (the connection's inbox)
    assert host.runs == 0
    assert len(made) == 1 and closed == made

    monkeypatch.setattr(hosted, "subscribe", subscribe)
    async with _hosts(nats_server.url, [bob]):
        runtime = NatsAgentRuntime(nc, run_namespace(CUSTOMER, run_id))
        chat = build_team(spec, {m.agent_id: m for m in members}, runtime, run_id)
        await runtime.start()
        await join_members(nc, CUSTOMER, run_id, [m.agent_id for m in members])
        result = await chat.run(task="take turns")
        assert [m.source for m in result.messages] == ["user", "alice", "bob", "alice"]
        assert host.runs == 1 and len(made) == 2 and closed == made[:1]
        await runtime.stop()
    await host.stop()
    assert closed == made
    await hosted.close()
    await nc.close()
