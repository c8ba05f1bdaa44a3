"""The processes of the teams benchmark besides its own: an echo agent on our NATS runtime or on AutoGen's
gRPC worker runtime, a raw nats-py responder, an echo on agent.wire (the runtime's transport), a team member
(Caravan's team host), a stand-in for a member on the runtime's transport (``relay``: the team's message
pattern over agent.wire, with no AgentChat and no runtime) or on a blocking socket (``socket``: the same pattern
with a client that does nothing else, so that what is left is the server's and the kernel's); and the callers
of the request/reply part (``call-<kind>``), one process per way of asking. Each prints "ready".

A caller reads a count on each line of its input, sends that many requests one after the other, and writes their
times in seconds and the CPU time it spent on them as one JSON line. Each way of asking has a process of its own, so
that none is measured in a process another one has used: with all of them in the bench's process, gRPC's p50 was
4-16% slower in the rounds that followed our runtime's polling (agent.wire) than with polling off (4 runs, A/B
interleaved), likely because Linux wakes a process that has just used more CPU a little later."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import nats
from autogen_core import AgentId, MessageContext, RoutedAgent, rpc, try_get_known_serializers_for_type

from agent.aio import run
from agent.protocol import AgentDefinition, ModelConfig
from agent.runtime import NatsAgentRuntime
from agent.teamhost import TeamHost
from agent.wire import Wire

RELAY_REQUEST, RELAY_GROUP = 200, 540  # bytes a team run sends per message, framed (the answer implies the output)


class SocketClient:
    """A NATS client on a blocking socket that only subscribes, publishes and reads messages: what a message costs
    on it is the server's and the kernel's. Answers the server's PINGs; knows no reconnect, TLS or auth."""

    def __init__(self, url: str) -> None:
        where = urlsplit(url)
        self._sock = socket.create_connection((where.hostname, where.port))
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buf = b""
        self._line()  # the server's INFO
        self._sock.sendall(b'CONNECT {"verbose":false,"pedantic":false,"echo":false}\r\n')
        self._sids = 0

    def subscribe(self, subject: str) -> int:
        self._sids += 1
        self._sock.sendall(b"SUB %s %d\r\n" % (subject.encode(), self._sids))
        return self._sids

    def flush(self) -> None:
        """Once the server has everything sent before (its PONG)."""
        self._sock.sendall(b"PING\r\n")
        while self._line() != b"PONG":
            pass

    def publish(self, subject: str, payload: bytes) -> None:
        self._sock.sendall(b"PUB %s %d\r\n%s\r\n" % (subject.encode(), len(payload), payload))

    def next_msg(self) -> int:
        """The subscription id of the next message (its payload read and dropped)."""
        while True:
            line = self._line()
            if line.startswith(b"MSG "):
                size = int(line.rsplit(b" ", 1)[1])
                self._take(size + 2)
                return int(line.split(b" ")[2])
            if line == b"PING":
                self._sock.sendall(b"PONG\r\n")
            elif line.startswith(b"-ERR"):
                raise ConnectionError(line.decode())

    def _line(self) -> bytes:
        while (end := self._buf.find(b"\r\n")) < 0:
            self._fill()
        line, self._buf = self._buf[:end], self._buf[end + 2 :]
        return line

    def _take(self, size: int) -> None:
        while len(self._buf) < size:
            self._fill()
        self._buf = self._buf[size:]

    def _fill(self) -> None:
        data = self._sock.recv(65536)
        if not data:
            raise ConnectionError("the server closed the connection")
        self._buf += data

    def close(self) -> None:
        self._sock.close()


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


async def call(kind: str, address: str, extra: str) -> None:
    """A caller (see the module docstring): ``kind`` is runtime, grpc, raw or wire; ``address`` the NATS server's
    (for grpc: where its host listens, in this process); ``extra`` the runtime's namespace."""
    ask: Callable[[int], Awaitable[object]]
    if kind == "grpc":
        from autogen_ext.runtimes.grpc import GrpcWorkerAgentRuntime, GrpcWorkerAgentRuntimeHost

        host = GrpcWorkerAgentRuntimeHost(address=address)
        host.start()
        grpc = GrpcWorkerAgentRuntime(host_address=address)
        await grpc.start()
        for cls in (Ping, Pong):  # it learns the types it reads back, as autogen_core asks
            grpc.add_message_serializer(try_get_known_serializers_for_type(cls))

        async def ask(i: int) -> None:
            assert (await grpc.send_message(Ping(i), AgentId("echo", "default"))) == Pong(i)

    else:
        nc = await nats.connect(address)
        if kind == "runtime":
            ours = NatsAgentRuntime(nc, extra)
            await ours.start()
            for cls in (Ping, Pong):
                ours.add_message_serializer(try_get_known_serializers_for_type(cls))

            async def ask(i: int) -> None:
                assert (await ours.send_message(Ping(i), AgentId("echo", "default"))) == Pong(i)

        elif kind == "raw":

            async def ask(i: int) -> None:
                await nc.request("bench.echo", str(i).encode(), timeout=5)

        else:  # wire: a Ping's frame, its size on the runtime's path
            wire = Wire.of(nc)
            await wire.ready()

            async def ask(i: int) -> None:
                assert (await wire.ask("bench.wire", b'{"op":"msg","k":"default","n":%d}\n{"n":%d}' % (i, i), 5)).data

    print("ready", flush=True)
    while line := await asyncio.to_thread(sys.stdin.readline):
        times = []
        cpu = time.process_time()  # this process's, every thread's (the gRPC caller's host among them)
        for i in range(int(line)):
            started = time.perf_counter()
            await ask(i)
            times.append(time.perf_counter() - started)
        print(json.dumps({"times": times, "cpu_s": time.process_time() - cpu}), flush=True)


async def main(mode: str, address: str, extra: str) -> None:
    if mode.startswith("call-"):
        await call(mode.removeprefix("call-"), address, extra)
        return
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
        group = b"g" * RELAY_GROUP

        def speak(msg: nats.aio.msg.Msg) -> None:
            wire.send(f"{prefix}.group", group)  # the answer, which the manager's process hears as the output's too

        await wire.subscribe(f"{prefix}.member{index}", speak)
        await wire.subscribe(f"{prefix}.group", lambda msg: None)
        await nc.flush()
    elif mode == "socket":  # as relay, on a SocketClient, in a thread of its own (the loop only waits)
        prefix, index = extra.split()
        await asyncio.to_thread(socket_member, address, prefix, index)
        return
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


def socket_member(address: str, prefix: str, index: str) -> None:
    client = SocketClient(address)
    asked = client.subscribe(f"{prefix}.member{index}")
    client.subscribe(f"{prefix}.group")
    client.flush()
    print("ready", flush=True)
    group = b"g" * RELAY_GROUP
    while True:
        if client.next_msg() == asked:
            client.publish(f"{prefix}.group", group)


if __name__ == "__main__":
    run(main(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else ""))
