"""The agent worker in this process: what its health endpoint reports about its two NATS connections, and what
it does with its runs when it is told to stop."""

from __future__ import annotations

from pathlib import Path

import httpx

from agent.backends.base import Scope
from agent.protocol import ModelConfig
from agent.worker import AgentWorker, WorkerConfig
from control.models import AgentCreate, Role, TaskCreate
from control.natsserver import EmbeddedNats
from control.platform import ControlPlane
from control.services.auth import Principal
from control.services.killswitch import KillswitchRequest
from tests.conftest import make_settings
from tests.support.helpers import assert_eventually
from tests.support.nomad_double import NomadDouble


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


async def test_a_stop_that_comes_before_the_watch_hears_a_hard_killswitch_still_ends_the_runs_killed(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    """A hard killswitch writes its flag, then stops the agent's job (at once with ``wait_ms: 0``): the SIGTERM
    may reach the agent before its flag watch hears the write. Its runs then end ``killed``, as when it heard it
    first, not given back to their queue to start over once the agent is started again. (Nomad is the double,
    which runs nothing: the agent runs here, its watch deaf from the moment its task runs.)"""
    with NomadDouble() as double:
        settings = make_settings(nats_server.url, tmp_path / "data", scheduler="nomad", nomad_addr=double.address)
        async with ControlPlane(settings) as control:
            customer, _ = await control.auth.create_customer("c")
            slow = ModelConfig(provider="replay", name="s", responses=["never said"], delay_ms=120_000)
            agent = await control.agents.create(customer.id, AgentCreate(name="a", model=slow, tools=[]))
            task = await control.tasks.create(customer.id, TaskCreate(agent_id=agent.id, task="take your time"))
            config = WorkerConfig(agent_id=agent.id, customer_id=customer.id, nats_url=settings.nats_url)
            worker = AgentWorker(config)
            await worker.start()
            try:
                await assert_eventually(
                    lambda: control.tasks.get(customer.id, task.id), lambda t: t.status == "running"
                )
                assert worker._killswitch is not None
                await worker._killswitch.stop()  # it hears nothing more: the flag below is not heard in time
                request = KillswitchRequest(scope=Scope.AGENT, agent_id=agent.id, reason="abuse", hard=True, wait_ms=0)
                result = await control.killswitch.apply(Principal(Role.ADMIN, None, "admin:test"), request)
                assert (result.unacknowledged, result.stopped) == ([agent.id], [agent.id])
            finally:
                await worker.stop()  # the SIGTERM of the job's stop
            ended = await assert_eventually(
                lambda: control.tasks.get(customer.id, task.id), lambda t: t.status != "running"
            )
            assert (ended.status, ended.status_reason) == ("killed", "killswitch engaged (agent: abuse)")
