"""Issue 2 benchmark: time from POST /v1/agents to status `running`, beside the bare import floor, and the
idle memory of one agent process. Run by ./dev/bench; prints its figures."""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import time

from control.backends.local import LocalScheduler
from tests.bench.conftest import percentile, summary
from tests.conftest import Api
from tests.gateway.test_agents_api import wait_status

AGENTS = 20
FLOOR_RUNS = 10


def import_floor() -> list[float]:
    """`python -c "import autogen_agentchat.agents"`: the least any AutoGen agent process can take to start."""
    times = []
    for _ in range(FLOOR_RUNS):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import autogen_agentchat.agents"], check=True)
        times.append(time.perf_counter() - started)
    return times


async def time_to_running(api: Api, headers: dict[str, str], index: int) -> tuple[float, str]:
    body = {"name": f"bench{index}", "model": {"provider": "replay", "name": "s", "responses": ["ok"]}}
    started = time.perf_counter()
    response = await api.client.post("/v1/agents", json=body, headers=headers)
    assert response.status_code == 201, response.text
    agent_id = response.json()["id"]
    while True:
        agent = (await api.client.get(f"/v1/agents/{agent_id}", headers=headers)).json()
        if agent["status"] == "running":
            return time.perf_counter() - started, agent_id
        assert agent["status"] in ("pending", "starting"), agent
        await asyncio.sleep(0.005)


async def test_agent_start_latency_and_idle_memory(api: Api) -> None:
    _, headers = await api.new_customer("bench")
    floor_before = import_floor()
    latencies: list[float] = []
    agent_ids: list[str] = []
    for i in range(AGENTS):
        elapsed, agent_id = await time_to_running(api, headers, i)
        latencies.append(elapsed)
        agent_ids.append(agent_id)
        # one at a time, stopped again, so each start is measured on an otherwise idle machine
        await api.client.post(f"/v1/agents/{agent_id}/stop", headers=headers)
    floor_after = import_floor()
    floor = floor_before + floor_after

    # idle RSS: one agent, started, then left alone for a few seconds
    await api.client.post(f"/v1/agents/{agent_ids[0]}/start", headers=headers)
    agent = await wait_status(api, headers, agent_ids[0], "running")
    await asyncio.sleep(3)
    scheduler = api.control.scheduler
    assert isinstance(scheduler, LocalScheduler)
    (stats,) = await scheduler.alloc_stats(agent["namespace"], agent["job_id"])
    rss_mb = stats["memory_rss_mb"]

    ratio = statistics.median(latencies) / statistics.median(floor)
    print()
    print(f"POST /v1/agents -> running   {summary(latencies)}")
    print(f"import floor (same run)     {summary(floor)}")
    print(f"ratio p50 / floor p50        {ratio:.2f}x   (goal: <= 2x)")
    print(f"idle RSS of one agent        {rss_mb:.1f} MB   (goal: < 80 MB)")
    print(f"p95 / floor p50              {percentile(latencies, 95) / statistics.median(floor):.2f}x")
