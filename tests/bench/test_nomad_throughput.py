"""Issue 3 benchmark: render + plan + register throughput for 1,000 agents against the Nomad API double, and the
control plane's memory while it tracks them through Nomad's event stream. Run by ./dev/bench; prints figures.

The double runs in its own process so that the RSS measured here is the control plane's alone (the
scheduler is the control plane's part that registers and tracks jobs; NATS plays no part here)."""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from agent.protocol import ModelConfig
from control.backends.base import AllocState
from control.backends.nomad import NomadConfig, NomadScheduler
from control.jobspec import agent_job
from control.models import Agent
from tests.bench.conftest import summary
from tests.conftest import make_settings
from tests.support.helpers import assert_eventually

AGENTS = 1000
PER_CUSTOMER = 50
CONCURRENCY = 8
ROOT = Path(__file__).resolve().parents[2]
SERVE_DOUBLE = """
import sys
from tests.support.nomad_double import Node, NomadDouble
nodes = [Node(f"client-{i}", cpu=64_000, memory_mb=262_144) for i in range(8)]
with NomadDouble(nodes=nodes, time_scale=0.01) as double:
    print(double.address, flush=True)
    sys.stdin.read()
"""


@pytest.fixture
def nomad_address() -> Iterator[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVE_DOUBLE],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert proc.stdout is not None
        yield proc.stdout.readline().strip()
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=30)


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


async def test_render_plan_register_throughput_and_tracking_memory(nomad_address: str, tmp_path: Path) -> None:
    settings = make_settings(
        "nats://127.0.0.1:4222", tmp_path / "data", scheduler="nomad", max_agents_per_customer=PER_CUSTOMER
    )
    scheduler = NomadScheduler(NomadConfig(address=nomad_address, secret_env={}))
    model = ModelConfig(provider="replay", name="scripted", responses=["ok"])
    async with scheduler:
        customers = [f"cu-{i:012x}" for i in range(AGENTS // PER_CUSTOMER)]
        rss_idle = rss_mb()

        # render: agent record -> Nomad job JSON (pure)
        sample = [
            Agent(
                id=f"ag-{i:012x}",
                customer_id=customers[i % len(customers)],
                name="bench",
                system_message="x",
                model=model,
                job_id=f"caravan-ag-{i:012x}",
                namespace=f"caravan-{customers[i % len(customers)]}",
            )
            for i in range(AGENTS)
        ]
        started = time.perf_counter()
        jobs = [agent_job(agent, settings) for agent in sample]
        render_s = time.perf_counter() - started

        # plan alone (Nomad's dry run, nothing registered), one at a time
        plans: list[float] = []
        for job in jobs[:200]:
            t0 = time.perf_counter()
            await scheduler.plan(job)
            plans.append(time.perf_counter() - t0)

        # submit = ownership read + plan + secrets Variable + register (enforcing the plan's index) + the
        # evaluation followed by blocking query to its allocations; CONCURRENCY at a time
        latencies: list[float] = []
        queue: asyncio.Queue[dict[str, object]] = asyncio.Queue()
        for job in jobs:
            queue.put_nowait(job)

        async def worker() -> None:
            while not queue.empty():
                job = queue.get_nowait()
                t0 = time.perf_counter()
                result = await scheduler.submit(job)  # type: ignore[arg-type]
                latencies.append(time.perf_counter() - t0)
                assert result.alloc_ids

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        create_s = time.perf_counter() - started
        rss_registered = rss_mb()

        def running() -> int:
            return sum(1 for state, _ in scheduler._allocs.values() if state is AllocState.RUNNING)

        async def count() -> int:
            return running()

        started = time.perf_counter()
        await assert_eventually(count, lambda n: n >= AGENTS, within=300, what="every allocation seen running")
        settle_s = time.perf_counter() - started
        rss_tracking = rss_mb()

    print()
    print(
        f"render                      {AGENTS} jobs in {render_s * 1000:.0f} ms = {AGENTS / render_s:,.0f} jobs/s "
        f"(p50 {render_s / AGENTS * 1e6:.0f} us)"
    )
    print(f"plan (sequential, n=200)    {summary(plans)}   {len(plans) / sum(plans):,.0f} plans/s")
    print(f"submit (x{CONCURRENCY} parallel)       {summary(latencies)}")
    print(
        f"  = read + plan + Variable + register + eval followed: {AGENTS / create_s:,.1f} jobs/s "
        f"({AGENTS} in {create_s:.1f} s, median {statistics.median(latencies) * 1000:.1f} ms each)"
    )
    print(f"render + plan + register    {AGENTS / (render_s + create_s):,.1f} agents/s end to end")
    print(f"event stream: all {AGENTS} allocations seen running {settle_s:.1f} s after the last register")
    print(
        f"scheduler (control plane) RSS idle {rss_idle:.0f} MB -> registered {rss_registered:.0f} MB -> "
        f"tracking {AGENTS} agents {rss_tracking:.0f} MB  (+{(rss_tracking - rss_idle) * 1024 / AGENTS:.0f} KB/agent)"
    )
