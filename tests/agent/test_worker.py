"""The agent worker in this process: what its health endpoint reports about its two NATS connections."""

from __future__ import annotations

import httpx

from agent.protocol import ModelConfig
from agent.worker import AgentWorker, WorkerConfig
from control.models import AgentCreate
from control.platform import ControlPlane


async def test_health_fails_when_the_team_connection_is_down(control: ControlPlane) -> None:
    customer, _ = await control.auth.create_customer("c")
    agent = await control.agents.create(
        customer.id, AgentCreate(name="a", model=ModelConfig(provider="replay", name="s", responses=["x"]))
    )
    await control.agents.stop(customer.id, agent.id)  # run this one here instead of by the scheduler
    config = WorkerConfig(agent_id=agent.id, customer_id=customer.id, nats_url=control.settings.nats_url)
    async with AgentWorker(config) as worker, httpx.AsyncClient() as client:
        url = f"http://127.0.0.1:{worker.health_port}/health"
        up = await client.get(url)
        assert up.status_code == 200 and up.json()["team_nats"] == "connected"
        assert worker._team_nc is not None
        await worker._team_nc.close()
        down = await client.get(url)
        assert down.status_code == 503
        assert down.json()["nats"] == "connected" and down.json()["team_nats"] == "disconnected"
