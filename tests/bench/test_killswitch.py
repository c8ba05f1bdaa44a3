"""Issue 4 benchmark: with 50 running agents on the embedded stack, time from the killswitch API call to the
last acknowledgement (the call returns when all 50 acknowledged), p50 and p99 over 20 rounds (``BENCH_ROUNDS``),
beside a raw NATS publish to 50 subscriber processes that each answer, measured in the same run."""

from __future__ import annotations

import asyncio
import gc
import os
import statistics
import sys
import time
from pathlib import Path

import nats

from tests.bench.conftest import percentile
from tests.conftest import Api
from tests.gateway.test_agents_api import wait_status
from tests.support.helpers import assert_eventually, now

AGENTS = 50
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "20"))


class RawNats:
    """The baseline: one publish answered by 50 subscriber processes; a round ends with the 50th answer."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.ready: asyncio.Queue[bytes] = asyncio.Queue()
        self.acks: asyncio.Queue[bytes] = asyncio.Queue()
        self.procs: list[asyncio.subprocess.Process] = []

    async def __aenter__(self) -> RawNats:
        self.nc = await nats.connect(self.url)

        async def on_ready(msg: nats.aio.msg.Msg) -> None:
            await self.ready.put(msg.data)

        async def on_ack(msg: nats.aio.msg.Msg) -> None:
            await self.acks.put(msg.data)

        await self.nc.subscribe("bench.ready", cb=on_ready)
        await self.nc.subscribe("bench.ack", cb=on_ack)
        script = Path(__file__).with_name("_subscriber.py")
        for i in range(AGENTS):
            self.procs.append(await asyncio.create_subprocess_exec(sys.executable, str(script), self.url, str(i)))
        for _ in range(AGENTS):
            await asyncio.wait_for(self.ready.get(), timeout=60)
        for _ in range(3):  # warm-up rounds, not measured
            await self.round()
        return self

    async def round(self) -> float:
        started = time.perf_counter()
        await self.nc.publish("bench.ping", b"")
        for _ in range(AGENTS):
            await asyncio.wait_for(self.acks.get(), timeout=10)
        return time.perf_counter() - started

    async def __aexit__(self, *exc: object) -> None:
        for proc in self.procs:
            proc.kill()
            await proc.wait()
        await self.nc.close()


def line(label: str, values: list[float]) -> str:
    return (
        f"{label:<38} p50={statistics.median(values) * 1000:6.1f} ms  p99={percentile(values, 99) * 1000:6.1f} ms"
        f"  max={max(values) * 1000:6.1f} ms"
    )


async def test_killswitch_acknowledgement_latency(api: Api) -> None:
    gc.freeze()  # as `caravan up` does once it serves: the collector's full passes skip the startup objects
    _, headers = await api.new_customer("bench")
    body = {
        "model": {"provider": "replay", "name": "s", "responses": ["ok"]},
        "resources": {"cpu": 50, "memory_mb": 128},
    }
    created = await asyncio.gather(
        *(api.client.post("/v1/agents", json={**body, "name": f"a{i}"}, headers=headers) for i in range(AGENTS))
    )
    ids = [r.json()["id"] for r in created]
    for agent_id in ids:
        await wait_status(api, headers, agent_id, "running", within=180)
    # every instance registered and its check passing
    await assert_eventually(api.control.registry.instances, lambda found: len(found) == AGENTS, within=60)
    admin = await api.admin()

    engage: list[float] = []
    release: list[float] = []
    raw: list[float] = []
    server: list[float] = []
    seen: list[float] = []  # the 50th acknowledgement as a subscriber here sees it: where the time goes
    arrivals: dict[bool, list[float]] = {True: [], False: []}  # by the state acknowledged
    watcher = await nats.connect(api.control.settings.nats_url)

    async def on_agent_event(msg: nats.aio.msg.Msg) -> None:
        if b'"kind":"killswitch"' in msg.data:
            arrivals[b'"halted":true' in msg.data].append(time.perf_counter())

    await watcher.subscribe("caravan.events.*.agent.*", cb=on_agent_event)
    async with RawNats(api.control.settings.nats_url) as baseline:
        for _ in range(ROUNDS):
            raw.append(await baseline.round())
            await asyncio.sleep(0.1)
            for engaged, sink in ((True, engage), (False, release)):
                arrivals[engaged].clear()
                started = time.perf_counter()
                response = await api.client.post(
                    "/v1/admin/killswitch",
                    json={"scope": "all", "engaged": engaged, "reason": "bench", "wait_ms": 10_000},
                    headers=admin,
                )
                sink.append(time.perf_counter() - started)
                await assert_eventually(now(lambda: len(arrivals[engaged])), lambda n: n >= AGENTS)  # noqa: B023
                seen.append(arrivals[engaged][AGENTS - 1] - started)
                result = response.json()
                server.append(result["elapsed_ms"] / 1000)
                if (result["covered"], result["acknowledged"]) != (AGENTS, AGENTS):
                    agents = (await api.client.get("/v1/agents", headers=headers)).json()
                    raise AssertionError((result, sorted((a["status"], a["status_reason"]) for a in agents)[:5]))
                await asyncio.sleep(0.1)
    await watcher.close()

    print()
    print(f"{AGENTS} agents, {ROUNDS} rounds each, interleaved: raw NATS round, engage, release")
    print(line("killswitch engage -> last ack (API)", engage))
    print(line("killswitch release -> last ack (API)", release))
    print(line("raw NATS publish -> 50th reply", raw))
    print(line("(flag written -> last ack, in the server)", server))
    print(line("(API call -> 50th ack, seen by a subscriber in this process)", seen))
    print(
        f"engage p99 / goal (150 ms): {percentile(engage, 99) * 1000 / 150:.2f}; "
        f"engage p50 / raw p50: {statistics.median(engage) / statistics.median(raw):.1f}x"
    )
