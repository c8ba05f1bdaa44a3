"""Nothing is lost when the whole embedded stack restarts: NATS (JetStream on disk) and the control plane."""

from __future__ import annotations

from pathlib import Path

from control.natsserver import EmbeddedNats
from control.platform import ControlPlane
from tests.conftest import make_settings, serve_api
from tests.gateway.teams_support import TERMINAL, agents, script, start, task_status, team
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


async def test_tasks_in_flight_when_the_platform_stops_run_again_as_soon_as_it_is_back(tmp_path: Path) -> None:
    """A Ctrl-C stops the control plane (its team runs handed back), then the agents (their tasks handed back),
    then NATS; the next start runs both again at once, each as its next attempt. A hand-back was a plain nak,
    which JetStream keeps only in the server's memory: stopped right after, it forgot it, and the task waited
    for its ack wait (a minute by default, an hour here) showing `queued` ("back in its queue") or `running`."""
    store, data = tmp_path / "nats", tmp_path / "data"
    patient = {"task_ack_wait_s": 3600, "team_ack_wait_s": 3600}  # a run the restart lost comes back after an hour
    async with EmbeddedNats(store) as nats_server:
        control = ControlPlane(make_settings(nats_server.url, data, **patient))
        async with control, serve_api(control) as api:
            _, headers = await api.new_customer()
            made = await agents(
                api,
                headers,
                {  # slow enough to be under way as the platform stops
                    "steady": {"model": script("done at last", delay_ms=5_000)},
                    "writer": {"model": script("w1", "w2", delay_ms=3_000)},
                    "critic": {"model": script("c1", delay_ms=3_000)},
                },
            )
            members = [made["writer"]["id"], made["critic"]["id"]]
            pair = await team(api, headers, members=members, mode="round_robin", termination={"max_messages": 4})
            duo = await start(api, headers, pair["id"], "Write a line.")
            assert (await task_status(api, headers, duo, ("running", *TERMINAL)))["status"] == "running"
            single = await start_task(api, headers, made["steady"]["id"], "take your time")
            assert (await task_status(api, headers, single, ("running", *TERMINAL)))["status"] == "running"

    async with EmbeddedNats(store) as nats_server:  # the same store, on a new port
        control = ControlPlane(make_settings(nats_server.url, data, **patient))
        async with control, serve_api(control) as api:
            done = await task_status(api, headers, single, within=60)
            assert (done["status"], done["attempt"], done["result"]) == ("completed", 2, "done at last"), done
            assert [m["content"] for m in done["messages"]] == ["take your time", "done at last"]
            done = await task_status(api, headers, duo, within=60)
            assert (done["status"], done["attempt"]) == ("completed", 2), done
            assert [(m["source"], m["content"]) for m in done["messages"]] == [
                ("user", "Write a line."),
                ("writer", "w1"),
                ("critic", "c1"),
                ("writer", "w2"),
            ]
