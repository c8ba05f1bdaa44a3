"""Nothing is lost when the whole embedded stack restarts: NATS (JetStream on disk) and the control plane."""

from __future__ import annotations

from pathlib import Path

from control.natsserver import EmbeddedNats
from control.platform import ControlPlane
from tests.conftest import make_settings, serve_api
from tests.gateway.test_agents_api import agent_body, wait_status
from tests.gateway.test_tasks_api import finished, running_agent, start_task


async def test_customers_agents_and_tasks_survive_a_restart_and_agents_come_back(tmp_path: Path) -> None:
    store = tmp_path / "nats"
    async with EmbeddedNats(store) as nats_server:
        control = ControlPlane(make_settings(nats_server.url, tmp_path / "data"))
        async with control, serve_api(control) as api:
            customer_id, headers = await api.new_customer()
            agent = await running_agent(api, headers)
            task_id = await start_task(api, headers, agent["id"])
            before = await finished(api, headers, task_id)
    assert before["status"] == "completed"

    async with EmbeddedNats(store) as nats_server:  # the same store, on a new port
        control = ControlPlane(make_settings(nats_server.url, tmp_path / "data"))
        async with control, serve_api(control) as api:
            # the JWT secret and the keys live in JetStream too: the token from before still works
            listed = await api.client.get("/v1/agents", headers=headers)
            assert [a["id"] for a in listed.json()] == [agent["id"]]
            assert (await api.client.get(f"/v1/tasks/{task_id}", headers=headers)).json() == before
            customers = (await api.client.get("/v1/admin/customers", headers=await api.admin())).json()
            assert customer_id in [c["id"] for c in customers]
            # the agent was put back on the scheduler and serves new work
            await wait_status(api, headers, agent["id"], "running")
            again = await finished(api, headers, await start_task(api, headers, agent["id"]))
            assert again["status"] == "completed" and again["result"] == before["result"]


async def test_an_agent_that_failed_stays_failed_across_a_restart_until_started(tmp_path: Path) -> None:
    """A failed agent (its job gave up restarting) is given no task until it is started again: a restart of the
    platform does not start it behind the operator's back, nor forget why it failed."""
    store, data = tmp_path / "nats", tmp_path / "data"
    async with EmbeddedNats(store) as nats_server:
        crashing = make_settings(nats_server.url, data, agent_python="/bin/false", agent_restart_attempts=1)
        control = ControlPlane(crashing)
        async with control, serve_api(control) as api:
            _, headers = await api.new_customer()
            created = await api.client.post("/v1/agents", json=agent_body(), headers=headers)
            failed = await wait_status(api, headers, created.json()["id"], "failed")
    assert failed["status_reason"]

    async with EmbeddedNats(store) as nats_server:
        control = ControlPlane(make_settings(nats_server.url, data))  # a python that runs agents now
        async with control, serve_api(control) as api:
            url = f"/v1/agents/{failed['id']}"
            after = (await api.client.get(url, headers=headers)).json()
            assert (after["status"], after["status_reason"]) == ("failed", failed["status_reason"])
            assert await control.scheduler.job_status(failed["namespace"], failed["job_id"]) is None
            assert (await api.client.post(f"{url}/start", headers=headers)).status_code == 200
            await wait_status(api, headers, failed["id"], "running")
