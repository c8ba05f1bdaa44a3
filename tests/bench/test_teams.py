"""Issue 5 benchmark: our NATS agent runtime beside AutoGen's gRPC worker runtime and raw nats-py request/reply
(two agents in separate processes, measured in the same run, rounds interleaved, each way of asking from a
process of its own), and a 3-member round-robin team of 60 messages on a zero-latency model, members in their own
processes versus AgentChat in one process. The headline runs the distributed team as AgentChat runs its own, with
no checkpoints (its manager joins the members with ``states=False``); beside it, rounds interleaved, the same team
with each member sending its state after each turn for the checkpoints (as team tasks run: their cost through
the whole platform is tests/bench/test_team_tasks.py's), with its manager not polling for its members' answers,
and with each answer's message for the team's output sent apart, as to an older manager. Beside the team, the
floor of its transport: the same pattern of NATS messages between processes on the runtime's own path,
agent.wire (the manager asks a member, the member answers to the manager and the group), with no AgentChat and no
runtime; and the server's floor: that pattern again between blocking sockets that do nothing else, so that what
it costs is nats-server's and the kernel's.
Run by ./dev/bench; prints its figures."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path

import nats
from autogen_agentchat.agents import AssistantAgent
from autogen_agentchat.conditions import MaxMessageTermination
from autogen_agentchat.teams import RoundRobinGroupChat

from agent.models import create_model_client
from agent.protocol import AgentDefinition, ModelConfig
from agent.runtime import NatsAgentRuntime
from agent.teamprotocol import run_namespace
from agent.wire import SPIN_ENV, Wire, spin_s_from
from control.natsserver import EmbeddedNats
from control.teams.build import build_team
from control.teams.models import Team, Termination
from tests.bench._team_peer import RELAY_REQUEST, SocketClient
from tests.bench.conftest import percentile
from tests.support.helpers import free_port, join_members

MESSAGES = int(os.environ.get("BENCH_MESSAGES", "1000"))
ROUNDS = 5
TEAM_MESSAGES = 60
TEAM_ROUNDS = 15  # a round is a fraction of a second: enough of them that a busy moment does not decide
PEER = Path(__file__).with_name("_team_peer.py")
CUSTOMER = "cu-00000000beef"


@contextlib.asynccontextmanager
async def peer(*args: str, env: dict[str, str] | None = None) -> AsyncIterator[subprocess.Popen[bytes]]:
    """A process of ``_team_peer.py`` (its input a pipe, as callers read theirs), once it says it is ready; ``env``
    added to this process's environment. Started with ``subprocess.Popen``, not the event loop's: a child forked
    beside threads (gRPC's, when it ran in this process) can hang before its exec (seen: a whole bench run stuck
    for twenty minutes on its second peer). CPython starts it with vfork(), which runs no fork handlers."""
    proc = subprocess.Popen(  # noqa: ASYNC220 (see above)
        [sys.executable, str(PEER), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ, **env} if env else None,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 60)
        assert line.strip() == b"ready", line
        yield proc
    finally:
        proc.kill()
        await asyncio.to_thread(proc.wait)


class Caller:
    """A caller process of ``_team_peer.py`` (``call-<kind>``): :meth:`ask` has it send requests and returns
    their times."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self._proc = proc
        self.cpu_s = 0.0  # the caller's CPU time on the requests asked since reset()
        self.asked = 0

    def reset(self) -> None:
        self.cpu_s, self.asked = 0.0, 0

    async def ask(self, n: int) -> list[float]:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(b"%d\n" % n)
        self._proc.stdin.flush()
        answer = json.loads(await asyncio.wait_for(asyncio.to_thread(self._proc.stdout.readline), 300))
        times: list[float] = answer["times"]
        assert len(times) == n
        self.cpu_s += answer["cpu_s"]
        self.asked += n
        return times


@contextlib.asynccontextmanager
async def caller(kind: str, *args: str, spin_us: str | None = None) -> AsyncIterator[Caller]:
    """``spin_us``: the caller's CARAVAN_SPIN_US (default: the bench's own)."""
    async with peer(f"call-{kind}", *args, env={SPIN_ENV: spin_us} if spin_us is not None else None) as proc:
        yield Caller(proc)


def line(name: str, values: list[float]) -> str:
    return f"{name:<28} p50={statistics.median(values) * 1e6:7.0f} us  p99={percentile(values, 99) * 1e6:7.0f} us"


async def test_request_reply_and_team_against_baselines(tmp_path: Path) -> None:
    async with EmbeddedNats(tmp_path / "nats") as server:
        namespace = "caravan.rt.bench.rpc"
        samples: dict[str, list[float]] = {
            "caravan runtime": [],
            "autogen gRPC runtime": [],
            "raw nats-py": [],
            "agent.wire (its transport)": [],
            "caravan runtime, no polling": [],
        }
        grpc_host = f"127.0.0.1:{free_port()}"  # in the gRPC caller's process
        async with contextlib.AsyncExitStack() as stack:
            callers = [
                await stack.enter_async_context(caller("runtime", server.url, namespace)),
                await stack.enter_async_context(caller("grpc", grpc_host)),
                await stack.enter_async_context(caller("raw", server.url)),
                await stack.enter_async_context(caller("wire", server.url)),
                await stack.enter_async_context(caller("runtime", server.url, namespace, spin_us="0")),
            ]
            for args in (
                ("runtime", server.url, namespace),
                ("grpc", grpc_host),
                ("raw", server.url),
                ("wire", server.url),
            ):
                await stack.enter_async_context(peer(*args))
            for each in callers:
                await each.ask(100)  # warm up
                each.reset()
            for _ in range(ROUNDS):
                for name, each in zip(samples, callers, strict=True):
                    samples[name] += await each.ask(MESSAGES // ROUNDS)

        nc = await nats.connect(server.url)
        usage: dict[str, list[Usage]] = {}
        team = await team_rounds(nc, server, usage)
        await nc.close()

    print()
    print(f"request/reply between two processes, {MESSAGES} messages each, rounds interleaved, a caller process each")
    for (name, values), each in zip(samples.items(), callers, strict=True):
        print(f"{line(name, values)}  caller CPU {each.cpu_s / each.asked * 1e6:4.0f} us/request")
    print("(the gRPC caller's CPU includes its host's, which runs in its process)")
    p50 = {name: statistics.median(values) for name, values in samples.items()}
    print(f"callers poll for answers for {spin_s_from(os.environ) * 1e6:.0f} us ({SPIN_ENV}; 'no polling': 0)")
    print(f"caravan / gRPC p50            {p50['caravan runtime'] / p50['autogen gRPC runtime']:.2f}x  (goal <= 0.4x)")
    print(f"caravan / raw NATS p50        {p50['caravan runtime'] / p50['raw nats-py']:.2f}x  (goal <= 2x)")
    print(f"no polling / gRPC p50         {p50['caravan runtime, no polling'] / p50['autogen gRPC runtime']:.2f}x")
    transport = p50["agent.wire (its transport)"]
    print(
        f"its transport / gRPC p50      {transport / p50['autogen gRPC runtime']:.2f}x  (the runtime's own part: "
        f"{(p50['caravan runtime'] - transport) * 1e6:.0f} us)"
    )
    per = {name: statistics.median(values) / TEAM_MESSAGES for name, values in team.items()}
    local, remote = per["local"], per["distributed"]
    print(f"round-robin team, 3 members, {TEAM_MESSAGES} messages, zero-latency model, {TEAM_ROUNDS} runs each")
    print(f"in-process (AgentChat)       {local * 1000:.2f} ms/message")
    print(
        f"members in 3 processes       {remote * 1000:.2f} ms/message  (as AgentChat's team: no checkpoints, so "
        "no member's state after each turn)"
    )
    print(f"distributed / in-process     {remote / local:.2f}x  (goal <= 1.3x)")
    paired = [each / alone for each, alone in zip(team["distributed"], team["local"], strict=True)]
    print(
        f"  paired by round             {statistics.median(paired):.2f}x  (quartiles {percentile(paired, 25):.2f}-"
        f"{percentile(paired, 75):.2f}x: each round runs both, one after the other)"
    )
    notes = {
        "with states": "each member's state after each turn, for the checkpoints, as team tasks run",
        "apart": "each answer sent twice, with the output's message apart, as to an older manager",
    }
    for variant, note in notes.items():
        ratio = statistics.median([each / head for each, head in zip(team[variant], team["distributed"], strict=True)])
        print(
            f"{variant:<28} {per[variant] * 1000:.2f} ms/message  {per[variant] / local:.2f}x  ({note}; "
            f"{ratio:.3f}x the headline, paired by round)"
        )
    print_usage(usage, local)
    floor, bare = per["floor"], per["server floor"]
    print(f"transport floor (agent.wire, same messages, no AgentChat)  {floor * 1000:.2f} ms/message")
    print(f"(in-process + floor) / in-process  {(local + floor) / local:.2f}x")
    print(
        f"server floor (the same messages between blocking sockets: nats-server and the kernel)  "
        f"{bare * 1000:.2f} ms/message"
    )
    print(f"(in-process + server floor) / in-process  {(local + bare) / local:.2f}x")


def zero_model(name: str) -> ModelConfig:
    return ModelConfig(provider="replay", name="zero", responses=[f"{name} says {i}" for i in range(1000)])


VARIANTS: dict[str, dict[str, bool]] = {
    "distributed": {"states": False},  # the headline: a manager keeping no checkpoints, as AgentChat's own team
    "with states": {},  # as the platform's runner joins: each member's state after each turn, for the checkpoints
    "apart": {"states": False, "output_implied": False},  # each answer's output message sent apart (older manager)
}
"""The distributed team's variants, by how the manager joins the members (``MemberJoin``), each run every round
(in a rotating order)."""


@dataclass(frozen=True)
class Usage:
    """What a team run cost each kind of process it ran in: seconds on a CPU, and seconds it was ready to run but
    waited for one (the scheduler's run queue), every thread counted."""

    cpu: dict[str, float]
    waited: dict[str, float]


def schedstat(pids: Iterable[int]) -> tuple[float, float]:
    """Seconds on a CPU and seconds waiting for one, so far, of every thread of these processes (Linux's
    ``/proc/<pid>/task/<tid>/schedstat``); a thread that ended meanwhile is not counted."""
    cpu = waited = 0
    for pid in pids:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                fields = Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()
                cpu, waited = cpu + int(fields[0]), waited + int(fields[1])
    return cpu / 1e9, waited / 1e9


def schedstat_here() -> bool:
    """Whether this system says what :func:`schedstat` reads."""
    return Path(f"/proc/{os.getpid()}/task/{os.getpid()}/schedstat").is_file()


class Metered:
    """``with Metered(roles) as m: ...`` then ``m.usage``: :class:`Usage` of each role (a name and its processes)
    over the block."""

    def __init__(self, roles: dict[str, list[int]]) -> None:
        self._roles = roles
        self._before: dict[str, tuple[float, float]] = {}
        self.usage = Usage({}, {})

    def __enter__(self) -> Metered:
        self._before = {role: schedstat(pids) for role, pids in self._roles.items()}
        return self

    def __exit__(self, *exc: object) -> None:
        for role, pids in self._roles.items():
            cpu, waited = schedstat(pids)
            self.usage.cpu[role] = cpu - self._before[role][0]
            self.usage.waited[role] = waited - self._before[role][1]


def print_usage(usage: dict[str, list[Usage]], local_s: float) -> None:
    """CPU time per message of the in-process team and of the distributed one (the headline), medians of the
    runs; and the least time per message the distributed team's CPU time allows on this machine's cores, beside
    the in-process team's time (``local_s``, per message)."""
    if not usage:
        print("CPU time per message: not measured (this system has no /proc/<pid>/task/<tid>/schedstat)")
        return

    def per(runs: list[Usage], role: str, field: str = "cpu") -> float:
        return statistics.median(getattr(run, field)[role] for run in runs) / TEAM_MESSAGES

    def total(runs: list[Usage]) -> float:
        return statistics.median(sum(run.cpu.values()) for run in runs) / TEAM_MESSAGES

    alone = per(usage["local"], "this process")
    cores = len(os.sched_getaffinity(0))
    print("CPU time per message, every thread of the processes a run used (medians of the runs):")
    print(f"  in-process                 {alone * 1e6:5.0f} us")
    runs = usage["distributed"]
    print(
        f"  distributed                {total(runs) * 1e6:5.0f} us  = {total(runs) / alone:.2f}x  ("
        + ", ".join(f"{role} {per(runs, role) * 1e6:.0f}" for role in runs[0].cpu)
        + ")"
    )
    print(
        "  distributed, ready to run but waiting for a CPU: "
        + ", ".join(f"{role} {per(runs, role, 'waited') * 1e6:.0f} us" for role in runs[0].cpu)
    )
    least = total(runs) / cores
    print(
        f"  the distributed team's CPU time over {cores} cores: {least * 1000:.2f} ms/message, "
        f"{least / local_s:.2f}x the in-process time (no schedule of its processes on these cores runs it faster)"
    )


async def team_rounds(nc: nats.NATS, server: EmbeddedNats, usage: dict[str, list[Usage]]) -> dict[str, list[float]]:
    """Time of a run of the team, each round: in-process ("local"), each of :data:`VARIANTS`, the transport floor
    ("floor") and the server's ("server floor"). ``usage`` gets what the in-process runs and the headline's
    cost each process (see :class:`Usage`), where Linux says."""
    url = server.url
    names = ["alpha", "beta", "gamma"]
    ids = {name: f"ag-00000000000{i}" for i, name in enumerate(names)}
    members = {
        ids[n]: AgentDefinition(agent_id=ids[n], customer_id=CUSTOMER, name=n, system_message="", model=zero_model(n))
        for n in names
    }
    spec = Team(
        id="tm-000000000000",
        customer_id=CUSTOMER,
        name="bench",
        members=list(members),
        mode="round_robin",
        termination=Termination(max_messages=TEAM_MESSAGES + 1),
    )
    times: dict[str, list[float]] = {
        "local": [],
        **{variant: [] for variant in VARIANTS},
        "floor": [],
        "server floor": [],
    }
    relay = Relay(nc, "bench.relay", len(names))
    async with contextlib.AsyncExitStack() as stack:
        member_pids = []
        for i, n in enumerate(names):
            member = await stack.enter_async_context(peer("member", url, f"{CUSTOMER} {ids[n]} {n}"))
            member_pids.append(member.pid)
            await stack.enter_async_context(peer("relay", url, f"bench.relay {i}"))
            await stack.enter_async_context(peer("socket", url, f"bench.socket {i}"))
        await relay.start()
        sockets = SocketManager(url, "bench.socket", len(names))
        stack.callback(sockets.close)
        assert server.pid is not None
        metered = schedstat_here()
        roles = {"manager": [os.getpid()], "members": member_pids, "nats-server": [server.pid]}
        for round_ in range(TEAM_ROUNDS + 1):
            agents = [AssistantAgent(n, model_client=create_model_client(zero_model(n))) for n in names]
            local = RoundRobinGroupChat(list(agents), termination_condition=MaxMessageTermination(TEAM_MESSAGES + 1))
            with Metered({"this process": [os.getpid()]}) as meter:
                started = time.perf_counter()
                result = await local.run(task="count")
                elapsed = time.perf_counter() - started
            assert len(result.messages) == TEAM_MESSAGES + 1
            if round_:
                times["local"].append(elapsed)
                if metered:
                    usage.setdefault("local", []).append(meter.usage)

            variants = list(enumerate(VARIANTS.items()))
            shift = round_ % len(variants)  # each variant in each place in turn: none always follows the in-process
            for i, (variant, terms) in variants[shift:] + variants[:shift]:
                run_id = f"rn-{round_:011x}{i}"
                runtime = NatsAgentRuntime(nc, run_namespace(CUSTOMER, run_id))
                chat = build_team(spec, members, runtime, run_id)
                await runtime.start()
                await join_members(nc, CUSTOMER, run_id, members, **terms)
                with Metered(roles) as meter:  # what is timed, as the in-process run's
                    started = time.perf_counter()
                    result = await chat.run(task="count")
                    elapsed = time.perf_counter() - started
                assert len(result.messages) == TEAM_MESSAGES + 1, result.stop_reason
                await nc.publish(f"{runtime.namespace}.x.end", b"")
                await runtime.stop()
                if round_:
                    times[variant].append(elapsed)
                    if metered and variant == "distributed":
                        usage.setdefault(variant, []).append(meter.usage)

            elapsed = await relay.run(TEAM_MESSAGES)
            if round_:
                times["floor"].append(elapsed)
            elapsed = await asyncio.to_thread(sockets.run, TEAM_MESSAGES)
            if round_:
                times["server floor"].append(elapsed)
    return times


class Relay:
    """The manager's side of the transport floor: ask member n % 3 to speak, and on its group message the next.
    On the path the runtime's messages take (agent.wire), so the floor is the runtime's own transport."""

    def __init__(self, nc: nats.NATS, prefix: str, members: int) -> None:
        self._nc, self._wire, self._prefix, self._members = nc, Wire.of(nc), prefix, members
        self._heard = 0
        self._target = 0
        self._done: asyncio.Future[None] | None = None

    async def start(self) -> None:
        await self._wire.subscribe(f"{self._prefix}.group", self._on_group)
        await self._nc.flush()

    async def run(self, messages: int) -> float:
        self._heard, self._target = 0, messages
        self._done = asyncio.get_running_loop().create_future()
        started = time.perf_counter()
        self._ask(0)
        await self._done
        return time.perf_counter() - started

    def _ask(self, n: int) -> None:
        self._wire.send(f"{self._prefix}.member{n % self._members}", b"r" * RELAY_REQUEST)

    def _on_group(self, msg: nats.aio.msg.Msg) -> None:
        self._heard += 1
        if self._heard < self._target:
            self._ask(self._heard)
        elif self._done is not None and not self._done.done():
            self._done.set_result(None)


class SocketManager:
    """The manager's side of the server's floor, on a blocking socket (:class:`SocketClient`): as :class:`Relay`,
    with a client that does nothing else. Run in a thread: the event loop only waits."""

    def __init__(self, url: str, prefix: str, members: int) -> None:
        self._client, self._prefix, self._members = SocketClient(url), prefix, members
        self._client.subscribe(f"{prefix}.group")
        self._client.flush()

    def run(self, messages: int) -> float:
        request = b"r" * RELAY_REQUEST
        started = time.perf_counter()
        for n in range(messages):
            self._client.publish(f"{self._prefix}.member{n % self._members}", request)
            self._client.next_msg()  # the member's answer on the group's subject
        return time.perf_counter() - started

    def close(self) -> None:
        self._client.close()
