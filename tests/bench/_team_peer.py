"""The far side of the teams benchmark, in its own process: an echo agent on our NATS runtime or on AutoGen's
gRPC worker runtime, a raw nats-py responder, an echo on agent.wire (the runtime's transport), a team member
(Caravan's team host), or a stand-in for a member on the runtime's transport (``relay``: the team's message
pattern over agent.wire, with no AgentChat and no runtime). Prints "ready"."""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass

import nats
from autogen_core import MessageContext, RoutedAgent, rpc, try_get_known_serializers_for_type

from agent.aio import run
from agent.protocol import AgentDefinition, ModelConfig
from agent.runtime import NatsAgentRuntime
from agent.teamhost import TeamHost
from agent.wire import Wire

RELAY_REQUEST, RELAY_OUTPUT, RELAY_GROUP = 210, 430, 490  # bytes a team run sends per message, framed


@dataclass
class Ping:
    n: int


@dataclass
class Pong:
    n: int


class Echo(RoutedAgent):
    def __init__(self) -> None:
        super().__init__("echo")

    @rpc
    async def on_ping(self, message: Ping, ctx: MessageContext) -> Pong:
        return Pong(message.n)


async def main(mode: str, address: str, extra: str) -> None:
    if mode == "runtime":
        nc = await nats.connect(address)
        runtime = NatsAgentRuntime(nc, extra)
        await Echo.register(runtime, "echo", Echo, skip_class_subscriptions=True)  # type: ignore[arg-type]
        await runtime.start()
    elif mode == "grpc":
        from autogen_ext.runtimes.grpc import GrpcWorkerAgentRuntime

        worker = GrpcWorkerAgentRuntime(host_address=address)
        await worker.start()
        worker.add_message_serializer(try_get_known_serializers_for_type(Ping))
        worker.add_message_serializer(try_get_known_serializers_for_type(Pong))
        await Echo.register(worker, "echo", Echo, skip_class_subscriptions=True)
    elif mode == "raw":
        nc = await nats.connect(address)

        async def echo(msg: nats.aio.msg.Msg) -> None:
            await msg.respond(msg.data)

        await nc.subscribe("bench.echo", cb=echo)
        await nc.flush()
    elif mode == "wire":  # the runtime's transport alone: an echo on agent.wire, answered in the read loop
        nc = await nats.connect(address)
        wire = Wire.of(nc)
        await wire.subscribe("bench.wire", lambda msg: wire.send(msg.reply, msg.data))
        await nc.flush()
    elif mode == "relay":  # extra = "<prefix> <index>": asked to speak, publish what a member publishes
        prefix, index = extra.split()
        nc = await nats.connect(address, no_echo=True)
        wire = Wire.of(nc)  # the path the runtime's messages take
        output, group = b"o" * RELAY_OUTPUT, b"g" * RELAY_GROUP

        def speak(msg: nats.aio.msg.Msg) -> None:
            wire.send(f"{prefix}.output", output)
            wire.send(f"{prefix}.group", group)

        await wire.subscribe(f"{prefix}.member{index}", speak)
        await wire.subscribe(f"{prefix}.group", lambda msg: None)
        await nc.flush()
    else:  # member: extra = "<customer> <agent> <name>"
        customer_id, agent_id, name = extra.split()
        nc = await nats.connect(address, no_echo=True)  # as the agent process connects for team runs
        model = ModelConfig(provider="replay", name="zero", responses=[f"{name} says {i}" for i in range(1000)])
        definition = AgentDefinition(
            agent_id=agent_id, customer_id=customer_id, name=name, system_message="", model=model
        )
        await TeamHost(nc, definition, f"bench-{name}").start()
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    run(main(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else ""))
