"""A member's states sent as deltas put together to exactly the state AgentChat saves, turn after turn; what
goes out when a state cannot be sent."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import nats
import pytest
from autogen_agentchat.agents import AssistantAgent
from autogen_agentchat.messages import TextMessage
from autogen_core import CancellationToken
from nats.aio.msg import Msg

from agent.models import create_model_client
from agent.protocol import AgentDefinition, ModelConfig, ScriptedToolCall
from agent.teamhost import FULL_STATE_EVERY, _Container, _state_publisher, _StateSender, member_agent
from agent.teamprotocol import STATE_AFTER_HEADER, STATE_BASE_HEADER
from agent.wire import Wire
from control.natsserver import EmbeddedNats
from control.teams.checkpoints import TurnCheckpoints, _Sent
from control.teams.models import Checkpoint
from tests.support.helpers import nats_connect

TURNS = FULL_STATE_EVERY + 4


class _Wire:
    """What the member published, in order; a manager's chain of states built from it as ``on_state`` does."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, dict[str, str]]] = []
        self.last: _Sent | None = None

    async def publish(self, body: bytes, headers: dict[str, str]) -> bool:
        self.sent.append((body, dict(headers)))
        base = headers.get(STATE_BASE_HEADER)
        if base is None:
            self.last = _Sent(headers[STATE_AFTER_HEADER], body)
        else:
            assert self.last is not None and self.last.after == base
            self.last = _Sent(headers[STATE_AFTER_HEADER], body, self.last)
        return True


def _member(deltas: bool = True) -> tuple[_Container, AssistantAgent, _Wire]:
    model = create_model_client(ModelConfig(provider="replay", name="m", responses=[f"answer {i}" for i in range(99)]))
    agent = AssistantAgent(name="alice", model_client=model)
    wire = _Wire()
    sender = _StateSender("alice", wire.publish, lambda: deltas)
    return _Container("tk", agent, model, sender), agent, wire


async def _turn(container: _Container, agent: AssistantAgent, wire: _Wire, i: int) -> None:
    task = [TextMessage(source="bob", content=f"question {i}")]
    answer = await agent.on_messages(task, CancellationToken())
    container._message_buffer.append(TextMessage(source="carol", content=f"after {i}"))  # a buffered message
    await container._sender.send(container, answer.chat_message.id)  # type: ignore[union-attr]


def _whole(state: Any) -> Any:
    return json.loads(json.dumps(state, default=lambda v: v.model_dump(mode="json")))


async def test_deltas_add_up_to_the_whole_state() -> None:
    container, agent, wire = _member()
    for i in range(TURNS):
        await _turn(container, agent, wire, i)
        assert wire.last is not None
        assert wire.last.read() == _whole(await container.save_state())
    kinds = [STATE_BASE_HEADER in headers for _, headers in wire.sent]
    assert kinds[0] is False and kinds[FULL_STATE_EVERY] is False  # whole at first, then every so many turns
    assert sum(kinds) == TURNS - 2


async def test_deltas_of_a_member_that_calls_tools_add_up_too() -> None:
    """A tool-using member's context holds the model's calls and the tools' results beside the text."""
    script: list[str | ScriptedToolCall] = []
    for i in range(4):
        script += [ScriptedToolCall(tool="word_count", arguments={"text": f"count these {i} words"}), f"done {i}"]
    config = ModelConfig(provider="replay", name="m", responses=script)
    definition = AgentDefinition(
        agent_id="ag-000000000001",
        customer_id="cu-000000000001",
        name="alice",
        system_message="",
        tools=["word_count"],
        model=config,
    )
    model = create_model_client(config)
    agent = member_agent(definition, [], model)
    wire = _Wire()
    container = _Container("tk", agent, model, _StateSender("alice", wire.publish, lambda: True))
    for i in range(4):
        await _turn(container, agent, wire, i)
        assert wire.last is not None
        assert wire.last.read() == _whole(await container.save_state())
    kinds = {type(message).__name__ for message in await agent._model_context.get_messages()}
    assert {"FunctionExecutionResultMessage", "AssistantMessage"} <= kinds
    assert sum(STATE_BASE_HEADER in headers for _, headers in wire.sent) == 3  # deltas after the first


async def test_a_reset_context_goes_whole() -> None:
    container, agent, wire = _member()
    for i in range(3):
        await _turn(container, agent, wire, i)
    await agent.on_reset(CancellationToken())
    await _turn(container, agent, wire, 3)
    assert STATE_BASE_HEADER not in wire.sent[-1][1]
    assert wire.last is not None and wire.last.read() == _whole(await container.save_state())


async def test_loaded_state_and_old_managers_get_whole_states() -> None:
    container, agent, wire = _member()
    await _turn(container, agent, wire, 0)
    await container.load_state(await container.save_state())  # a new attempt: its manager has no state yet
    await _turn(container, agent, wire, 1)
    assert STATE_BASE_HEADER not in wire.sent[-1][1]
    container, agent, wire = _member(deltas=False)
    for i in range(3):
        await _turn(container, agent, wire, i)
    assert not any(STATE_BASE_HEADER in headers for _, headers in wire.sent)


async def test_a_delta_to_a_missed_state_is_not_used() -> None:
    turns = TurnCheckpoints(repo=None, key="k", base=Checkpoint(), members=["alice"], record=lambda _: [])  # type: ignore[arg-type]
    container, agent, wire = _member()
    for i in range(2):
        await _turn(container, agent, wire, i)
    body, headers = wire.sent[1]  # the first (whole) state never reached the manager
    turns.on_state(Msg(None, subject="x.state", data=body, headers=headers))  # type: ignore[arg-type]
    assert turns._pushed["alice"] == (headers[STATE_AFTER_HEADER], None)


async def test_a_reset_while_a_state_is_sent_makes_the_next_one_whole() -> None:
    container, agent, wire = _member()
    sender = container._sender
    assert sender is not None
    publish = wire.publish

    async def reset_meanwhile(body: bytes, headers: dict[str, str]) -> bool:
        sender.reset()  # a new attempt's manager joined while this state was on its way
        return await publish(body, headers)

    sender._publish = reset_meanwhile
    await _turn(container, agent, wire, 0)
    sender._publish = publish
    await _turn(container, agent, wire, 1)
    assert STATE_BASE_HEADER not in wire.sent[-1][1]


async def test_a_state_too_big_goes_as_an_empty_one_and_a_closed_connection_is_not_called_too_big(
    nats_server: EmbeddedNats, caplog: pytest.LogCaptureFixture
) -> None:
    member, manager = await nats.connect(nats_server.url), await nats_connect(nats_server.url)
    states = await manager.subscribe("x.state")
    await manager.flush()
    send = _state_publisher(Wire.of(member), "x.state", "rn-1", "alice_tk")
    headers = {STATE_AFTER_HEADER: "m1", STATE_BASE_HEADER: "m0"}
    caplog.set_level(logging.WARNING, logger="caravan.teamhost")
    assert await send(b"x" * (member.max_payload + 1), dict(headers)) is False
    empty = await states.next_msg(timeout=10)
    assert empty.data == b"" and empty.headers == {STATE_AFTER_HEADER: "m1"}  # whole: no delta to a missing base
    assert "too big" in caplog.text
    caplog.clear()
    await member.close()
    assert await send(b"{}", dict(headers)) is False  # said, not raised: the turn goes on
    assert "could not be sent: nats: connection closed" in caplog.text and "too big" not in caplog.text
    await manager.close()


async def test_a_checkpoint_slow_to_store_spaces_out_the_next_ones() -> None:
    """A checkpoint grows with the conversation: once storing one takes long, the next ones come no more often than
    keeps storing them to a tenth of the run's time; the newest is still stored when the run is flushed."""
    from control.teams.checkpoints import WRITE_SHARE, _Snapshot

    class SlowStore:
        def __init__(self) -> None:
            self.puts: list[Checkpoint] = []

        async def put(self, key: str, record: Checkpoint) -> int:
            await asyncio.sleep(0.05)
            self.puts.append(record)
            return len(self.puts)

    store = SlowStore()
    turns = TurnCheckpoints(repo=store, key="k", base=Checkpoint(), members=[], record=lambda _: [])  # type: ignore[arg-type]
    for n in range(120):  # a turn every 5 ms for 0.6 s: a write every 50 ms would store about six
        turns._schedule(_Snapshot(n, 0, {}, {}, None, n))
        await asyncio.sleep(0.005)
    during = len(store.puts)
    await turns.flush()
    assert during <= 1 + 0.6 / (0.05 / WRITE_SHARE) + 1, during
    assert store.puts[-1].selector_position == 119  # the newest, stored at the flush
