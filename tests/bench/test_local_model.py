"""Issue 7 benchmark: tokens/s and time to first token of the local model through Caravan's agent path
(POST /v1/tasks → work queue → agent process → OpenAI client → fair-queueing proxy → server → chunk events
on NATS), beside a direct streamed request to the same server in the same run. Run by ./dev/bench."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

import httpx
import nats

from control.localmodel import LocalModel
from control.natsserver import EmbeddedNats
from control.platform import ControlPlane
from tests.conftest import make_settings, serve_api
from tests.gateway.test_agents_api import wait_status

ROUNDS = 7
MAX_TOKENS = 128
SYSTEM = "You are a helpful assistant."
PROMPT = "Tell me a long story about a caravan of camels crossing the desert."


def rate(stamps: list[float]) -> float:
    """Tokens per second once the first one has arrived."""
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


async def direct(server_url: str) -> tuple[float, list[float]]:
    body = {
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPT}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": True,
    }
    stamps: list[float] = []
    async with httpx.AsyncClient(timeout=120) as client:
        started = time.perf_counter()
        async with client.stream("POST", f"{server_url}/v1/chat/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    choices = json.loads(line[6:]).get("choices") or [{}]
                    if (choices[0].get("delta") or {}).get("content"):
                        stamps.append(time.perf_counter())
    return stamps[0] - started, stamps


class TaskWatch:
    """Arrival times of a task's chunk events on NATS, as an external subscriber sees them."""

    def __init__(self) -> None:
        self.chunks: dict[str, list[float]] = {}
        self.asked: dict[str, float] = {}  # the agent has the task and hands it to the model (its user message)
        self.done: dict[str, asyncio.Event] = {}

    async def on_event(self, msg: Any) -> None:
        now = time.perf_counter()
        event = json.loads(msg.data)
        task_id = event["task_id"]
        if event["kind"] == "chunk":
            self.chunks.setdefault(task_id, []).append(now)
        elif event["kind"] == "message" and event["source"] == "user":
            self.asked[task_id] = now
        elif event["kind"] == "status" and event["content"] in ("completed", "failed", "cancelled"):
            self.done.setdefault(task_id, asyncio.Event()).set()


async def test_local_model_through_caravan_beside_direct(
    local_model: LocalModel, nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    assert local_model.server is not None
    server_url = local_model.server.base_url
    settings = make_settings(nats_server.url, tmp_path / "data", local_model_url=local_model.url)
    async with ControlPlane(settings) as control, serve_api(control) as api:
        customer_id, headers = await api.new_customer("bench")
        model = {"provider": "local", "stream": True, "temperature": 0, "max_tokens": MAX_TOKENS}
        body = {"name": "bench", "system_message": SYSTEM, "model": model}
        created = await api.client.post("/v1/agents", json=body, headers=headers)
        agent = await wait_status(api, headers, created.json()["id"], "running")
        watch = TaskWatch()
        nc = await nats.connect(settings.nats_url)
        await nc.subscribe(f"caravan.events.{customer_id}.task.*", cb=watch.on_event)

        before_model: list[float] = []

        async def through_caravan() -> tuple[float, list[float]]:
            started = time.perf_counter()
            response = await api.client.post(
                "/v1/tasks", json={"agent_id": agent["id"], "task": PROMPT}, headers=headers
            )
            task_id = response.json()["id"]
            await asyncio.wait_for(watch.done.setdefault(task_id, asyncio.Event()).wait(), timeout=120)
            stamps = watch.chunks[task_id]
            before_model.append(watch.asked[task_id] - started)
            return stamps[0] - started, stamps

        try:
            await direct(server_url)  # warm both paths: the model's first prompt, the agent's imports
            await through_caravan()
            runs: dict[str, list[tuple[float, list[float]]]] = {"direct": [], "caravan": []}
            for _ in range(ROUNDS):  # interleaved, so both see the same machine
                runs["direct"].append(await direct(server_url))
                runs["caravan"].append(await through_caravan())
        finally:
            await nc.close()

    ttft = {k: statistics.median(t for t, _ in v) for k, v in runs.items()}
    tps = {k: statistics.median(rate(s) for _, s in v) for k, v in runs.items()}
    tokens = {k: statistics.median(len(s) for _, s in v) for k, v in runs.items()}
    print()
    print(f"local model: {local_model.model_name}, {local_model.server.threads} thread(s), {ROUNDS} rounds each")
    for k in ("direct", "caravan"):
        print(f"{k:8} tokens/s p50 {tps[k]:6.1f}   TTFT p50 {ttft[k] * 1000:6.0f} ms   tokens p50 {tokens[k]:.0f}")
    print(f"ratio tokens/s caravan / direct   {tps['caravan'] / tps['direct']:.2f}x   (goal: >= 0.90x)")
    print(
        f"ratio TTFT caravan / direct       {ttft['caravan'] / ttft['direct']:.2f}x   "
        f"(+{(ttft['caravan'] - ttft['direct']) * 1000:.0f} ms: REST, work queue, agent, proxy)"
    )
    print(f"  of which POST -> the agent's user message event   p50 {statistics.median(before_model) * 1000:.0f} ms")
    total = {k: statistics.median(t + (s[-1] - s[0]) for t, s in v) for k, v in runs.items()}
    print(f"ratio whole answer caravan / direct {total['caravan'] / total['direct']:.2f}x")
