"""A team task through the whole platform, beside the same team on the runtime alone, in the same run: three
agents started by the API (processes of the local scheduler), a round-robin team of 60 and of 300 messages on
a zero-latency model, time per message from ``POST /v1/tasks`` to the task's terminal event on NATS and to its
record saying so (what ``GET /v1/tasks/{id}`` answers). The baseline is AgentChat's team on our runtime with the
same three agent processes and nothing else: no events stored, no checkpoints, no task record. What lies between
the two is what the platform adds to every message. Run by ./dev/bench; prints its figures."""

from __future__ import annotations

import asyncio
import os
import statistics
import time

from agent.protocol import Event, EventKind
from agent.runtime import NatsAgentRuntime
from agent.teamprotocol import run_namespace
from control.models import TERMINAL_TASK_STATUSES
from control.teams.build import build_team
from tests.conftest import Api
from tests.gateway.teams_support import agents, script, team
from tests.support.helpers import join_members

SIZES = (60, 300)
ROUNDS = int(os.environ.get("BENCH_TEAM_TASK_ROUNDS", "5"))


async def test_team_task_through_the_platform_against_the_runtime_alone(api: Api) -> None:
    customer_id, headers = await api.new_customer()
    names = ("alpha", "beta", "gamma")
    made = await agents(api, headers, {n: {"model": script(*[f"{n} says {i}" for i in range(1000)])} for n in names})
    ids = [made[n]["id"] for n in names]
    definitions = {i: await api.control.agents.definition(customer_id, i) for i in ids}
    nc = api.control.jet.nc
    ends: dict[str, asyncio.Future[float]] = {}  # per task: when its terminal event came

    def end_of(task_id: str) -> asyncio.Future[float]:
        return ends.setdefault(task_id, asyncio.get_running_loop().create_future())

    async def on_event(msg: object) -> None:
        event = Event.model_validate_json(msg.data)  # type: ignore[attr-defined]
        terminal = event.kind == EventKind.STATUS and event.content in TERMINAL_TASK_STATUSES
        if terminal and event.task_id and not end_of(event.task_id).done():
            end_of(event.task_id).set_result(time.perf_counter())

    sub = await nc.subscribe(f"caravan.events.{customer_id}.task.*", cb=on_event)
    teams = {
        n: await team(api, headers, members=ids, mode="round_robin", termination={"max_messages": n + 1}) for n in SIZES
    }
    samples: dict[tuple[int, str], list[float]] = {}

    async def platform(n: int) -> None:
        started = time.perf_counter()
        body = {"team_id": teams[n]["id"], "task": "count"}
        task_id = (await api.client.post("/v1/tasks", json=body, headers=headers)).json()["id"]
        ended = await asyncio.wait_for(end_of(task_id), 120)
        while (task := (await api.client.get(f"/v1/tasks/{task_id}", headers=headers)).json())["status"] != "completed":
            assert time.perf_counter() - ended < 60, task["status"]
            await asyncio.sleep(0.005)  # a client that reads the record at once; the run is over
        assert len(task["messages"]) == n + 1
        samples.setdefault((n, "platform: terminal event"), []).append((ended - started) / n)
        samples.setdefault((n, "platform: record completed"), []).append((time.perf_counter() - started) / n)

    async def runtime_alone(n: int, round_: int) -> None:
        spec = await api.control.teams.get(customer_id, teams[n]["id"])
        run_id = f"rn-{n:08x}{round_:04x}"
        runtime = NatsAgentRuntime(nc, run_namespace(customer_id, run_id))
        chat = build_team(spec, {i: d for i, d in definitions.items() if d is not None}, runtime, run_id)
        await runtime.start()
        started = time.perf_counter()
        await join_members(nc, customer_id, run_id, ids)  # joining is part of a platform run too
        result = await chat.run(task="count")
        elapsed = time.perf_counter() - started
        assert len(result.messages) == n + 1, result.stop_reason
        await nc.publish(f"{runtime.namespace}.x.end", b"")
        await runtime.stop()
        samples.setdefault((n, "runtime alone"), []).append(elapsed / n)

    for round_ in range(ROUNDS + 1):  # round 0 warms up both paths
        for n in SIZES:
            await platform(n)
            await runtime_alone(n, round_)
        if round_ == 0:
            samples.clear()
    await sub.unsubscribe()

    print()
    print(f"team task, round robin, 3 members in agent processes, zero-latency model, {ROUNDS} rounds interleaved")
    for n in SIZES:
        base = statistics.median(samples[(n, "runtime alone")])
        for what in ("runtime alone", "platform: terminal event", "platform: record completed"):
            median = statistics.median(samples[(n, what)])
            print(f"{n:4d} messages  {what:<28} {median * 1000:6.2f} ms/message  {median / base:5.2f}x")
