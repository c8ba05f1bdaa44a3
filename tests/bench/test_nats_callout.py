"""Agents logging in to a NATS of the operator's own through the auth callout the control plane answers (configured
as nomad/nats.nomad.hcl configures it), beside the same agents as static users of a NATS's configuration (the
embedded default's auth.conf), measured in the same run:

- a mass reconnect: N agents (200, 1,000) logging in at once, as they all do when NATS restarts, each with its two
  connections (its own and its team runs'), each login tried again as nats-py tries an agent's (the answer awaited
  2 s, then 2 s before the next attempt): the time until all are in, each login's own time (its last attempt), and
  the attempts refused or timed out on the way;
- one login alone: ``LOGINS`` logins one after the other.

The store holds ``AGENTS`` agents of ``CUSTOMERS`` customers, records as the API writes them. The logins come from a
process of their own (tests/bench/_logins.py). ``BENCH_NATS_SERVER`` names another nats-server binary to run (the
image nomad/nats.nomad.hcl runs is 2.15's; Caravan needs 2.11 or later). Run by ./dev/bench; prints its figures."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import statistics
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.protocol import ModelConfig
from control import natsserver
from control.ids import new_id
from control.models import Agent, AgentStatus
from control.natsauth import NatsAuth, NatsCredentials
from control.natscallout import CalloutLogins
from control.natsserver import EmbeddedNats
from control.platform import ControlPlane
from control.store import Repo
from tests.bench.conftest import percentile
from tests.support.nats_users import callout_nats, callout_settings

CUSTOMERS = 100
AGENTS = int(os.environ.get("BENCH_CALLOUT_AGENTS", "1000"))
BURSTS = tuple(int(n) for n in os.environ.get("BENCH_CALLOUT_BURSTS", "200,1000").split(","))
CONNECTIONS = 2  # an agent's own and its team runs' (agent/worker.py)
LOGINS = int(os.environ.get("BENCH_CALLOUT_LOGINS", "200"))
DEADLINE_S = 45.0  # a login not let in by then is counted as never in


def agents() -> list[Agent]:
    customers = [new_id("cu") for _ in range(CUSTOMERS)]
    made = []
    for n in range(AGENTS):
        agent_id, customer_id = new_id("ag"), customers[n % CUSTOMERS]
        made.append(
            Agent(
                id=agent_id,
                customer_id=customer_id,
                name=f"agent-{n}",
                system_message="You answer the customer's questions about their orders. " * 8,
                model=ModelConfig(provider="openai", name="gpt-4o-mini"),
                status=AgentStatus.RUNNING,
                job_id=f"caravan-agent-{agent_id}",
                namespace=f"caravan-{customer_id}",
                scheduler={"job_id": f"caravan-agent-{agent_id}", "eval_id": new_id("ev"), "alloc_ids": [new_id("al")]},
            )
        )
    return made


async def run_logins(mode: str, url: str, logins: list[list[str]]) -> dict[str, Any]:
    job = {"mode": mode, "url": url, "logins": logins, "deadline_s": DEADLINE_S}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(Path(__file__).with_name("_logins.py")),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate(json.dumps(job).encode())
    assert proc.returncode == 0, out[-2000:]
    result: dict[str, Any] = json.loads(out)
    return result


@dataclass
class Target:
    server: EmbeddedNats
    logins: NatsAuth | CalloutLogins


@asynccontextmanager
async def static_nats(directory: Path, records: list[Agent]) -> AsyncIterator[Target]:
    auth = NatsAuth(directory)
    auth.set_agents({a.id: a.customer_id for a in records})
    async with EmbeddedNats(directory, auth=True) as server:
        yield Target(server, auth)


@asynccontextmanager
async def callout(directory: Path, records: list[Agent]) -> AsyncIterator[tuple[Target, ControlPlane]]:
    seed, login = callout_nats(directory / "nats")
    async with EmbeddedNats(directory / "nats", auth=True) as server:
        control = ControlPlane(callout_settings(server.url, directory / "data", seed, login))
        async with control:
            repo = Repo(control.jet.kv["agents"], Agent)
            for start in range(0, len(records), 250):
                batch = records[start : start + 250]
                await asyncio.gather(*(repo.create(f"{a.customer_id}.{a.id}", a) for a in batch))
            yield Target(server, CalloutLogins(seed)), control


def logins_of(target: Target, records: list[Agent]) -> list[list[str]]:
    made: list[NatsCredentials] = [target.logins.agent(a.id) for a in records]
    return [[c.user, c.password] for c in made]


def cpu_s(pid: int | None) -> float:
    """The CPU time (user and system) a running process has had."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_here_and_children() -> tuple[float, float]:
    """This process's CPU time (the control plane's), and that of its children waited for (the logins')."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time(), children.ru_utime + children.ru_stime


async def settled(counter: Counter[str]) -> int:
    """The callout's answers once it has answered nothing for half a second: it answers requests whose logins
    already gave up (the server waited 2 s), which the attempts the client counts do not show."""
    while True:
        seen = sum(counter.values())
        await asyncio.sleep(0.5)
        if sum(counter.values()) == seen:
            return seen


def ms(seconds: float) -> str:
    return f"{seconds * 1000:7.1f} ms"


def burst_row(label: str, result: dict[str, Any], wall: float, cpu: str) -> tuple[str, float]:
    logins = result["logins"]
    connected = [entry["connected"] for entry in logins if entry["connected"] is not None]
    last = [entry["last"] for entry in logins if entry["last"] is not None]
    refusals = Counter(reason for entry in logins for reason in entry["refusals"])
    retried = sum(1 for entry in logins if entry["refusals"])
    never = len(logins) - len(connected)
    all_in = max(connected) if not never else float("inf")
    said = ", ".join(f"{reason} {count}" for reason, count in sorted(refusals.items())) or "none"
    row = (
        f"  {label:<8} all in {all_in:6.2f} s   login p50 {ms(statistics.median(last))} p99 {ms(percentile(last, 99))}"
        f" max {ms(max(last))}   retried {retried}, never in {never}   refusals: {said}\n"
        f"           (run {wall:.1f} s; CPU s: {cpu})"
    )
    return row, all_in


async def test_a_mass_reconnect_through_the_callout_beside_static_users(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if os.environ.get("BENCH_NATS_SERVER"):
        monkeypatch.setattr(natsserver, "nats_server_binary", lambda: os.environ["BENCH_NATS_SERVER"])
    records = agents()
    async with (
        static_nats(tmp_path / "static", records) as static,
        callout(tmp_path / "callout", records) as (through_callout, control),
    ):
        served = control.nats_callout
        assert served is not None
        targets = {"static": static, "callout": through_callout}
        for target in targets.values():  # warm-up, not measured
            await run_logins("one_by_one", target.server.url, logins_of(target, records[:20]))

        print()
        v = control.jet.nc.connected_server_version
        print(f"{AGENTS} agents of {CUSTOMERS} customers in the store; nats-server {v.major}.{v.minor}.{v.patch}")
        alone: dict[str, list[float]] = {name: [] for name in targets}
        for round_ in range(4):  # interleaved in quarters
            chosen = records[round_ * LOGINS // 4 : (round_ + 1) * LOGINS // 4]
            for name, target in targets.items():
                result = await run_logins("one_by_one", target.server.url, logins_of(target, chosen))
                alone[name].extend(result["times"])
        medians = {name: statistics.median(times) for name, times in alone.items()}
        print(f"one login alone, {LOGINS} one after the other:")
        for name, times in alone.items():
            print(f"  {name:<8} p50 {ms(medians[name])}  p99 {ms(percentile(times, 99))}  max {ms(max(times))}")
        print(f"  callout / static p50: {medians['callout'] / medians['static']:.2f}x")

        for size in BURSTS:
            chosen = records[:size] * CONNECTIONS
            print(f"{size} agents, {len(chosen)} connections, at once (a NATS restart), retried as agents do:")
            all_in: dict[str, float] = {}
            for name, target in targets.items():
                answered = await settled(served.answered)
                logins = logins_of(target, chosen)
                here, children = cpu_here_and_children()
                server = cpu_s(target.server.pid)
                started = time.perf_counter()
                result = await run_logins("burst", target.server.url, logins)
                wall = time.perf_counter() - started
                server = cpu_s(target.server.pid) - server
                here, children = (
                    now - then for now, then in zip(cpu_here_and_children(), (here, children), strict=True)
                )
                cpu = f"nats-server {server:.2f}, control plane {here:.2f}, the agents' logins {children:.2f}"
                row, all_in[name] = burst_row(name, result, wall, cpu)
                print(row)
                if name == "callout":
                    print(f"           the callout answered {await settled(served.answered) - answered} requests")
            print(f"  all in, callout / static: {all_in['callout'] / all_in['static']:.2f}x")
