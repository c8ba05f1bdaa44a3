"""The team's manager, as the control plane runs it (control.teams.build), with its members in team hosts on
connections of their own: it polls for the answer of the member it asked to speak, and its first run waits no
round trip to the server for its subscriptions."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.msg import Msg

from agent.protocol import AgentDefinition, ModelConfig
from agent.runtime import NatsAgentRuntime
from agent.teamhost import TeamHost
from agent.teamprotocol import run_namespace
from agent.wire import Wire
from control.natsserver import EmbeddedNats
from control.teams.build import build_team
from control.teams.models import Team, Termination
from tests.support.helpers import FlushCounter, assert_eventually, join_members, now

CUSTOMER = "cu-0000000000aa"
NAMES = ("alice", "bob")


def _member(i: int, name: str) -> AgentDefinition:
    model = ModelConfig(provider="replay", name="m", responses=[f"{name} {n}" for n in range(9)], delay_ms=50)
    return AgentDefinition(
        agent_id=f"ag-00000000000{i}", customer_id=CUSTOMER, name=name, system_message="", model=model
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


@pytest.mark.parametrize("spin_us", [3_000_000, 0])
async def test_the_manager_polls_for_the_answer_of_the_member_it_asked(nats_server: EmbeddedNats, spin_us: int) -> None:
    """The answer comes on the group's subject, not as the answer to a request: the manager polls for it after
    each request to speak (Wire.expect), for the window only, and not at all with polling off."""
    members = [_member(i, name) for i, name in enumerate(NAMES)]
    spec = Team(
        id="tm-0000000000aa",
        customer_id=CUSTOMER,
        name="pair",
        members=[m.agent_id for m in members],
        mode="round_robin",
        termination=Termination(max_messages=5),
    )
    nc = await nats.connect(nats_server.url)
    wire = Wire.of(nc)
    wire.spin_s = spin_us / 1e6
    run_id = "rn-0000000000aa"
    runtime = NatsAgentRuntime(nc, run_namespace(CUSTOMER, run_id))
    asked: list[tuple[str, bool]] = []  # each request to speak as this connection sees it, and whether it polled

    def on_request(msg: Msg) -> None:  # called in the read loop, as the request comes back to this connection
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
        assert [name for name, _ in asked] == [f"{n}_{run_id}" for n in ("alice", "bob", "alice", "bob")]
        assert all(polled == bool(spin_us) for _, polled in asked), asked
        await runtime.stop()
    if spin_us:  # a window of 3 s from the last request: then it sleeps
        await assert_eventually(now(lambda: wire.spinning), lambda spinning: not spinning, what="polling to stop")
    await nc.close()
