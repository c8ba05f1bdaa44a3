"""The killswitch end to end: real agent processes on the local scheduler, real NATS, the admin API."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from nats.aio.msg import Msg

from agent.backends.base import Flag, Scope
from agent.protocol import (
    TASKS_STREAM,
    AgentDefinition,
    AgentEventKind,
    Event,
    agent_events_subject,
    consumer_name,
    utcnow,
)
from control.backends import create_flags
from control.backends.base import SchedulerError
from control.models import ChangeLease, Role
from control.natsserver import EmbeddedNats
from control.platform import ControlPlane
from control.services.auth import Principal
from control.services.killswitch import KillswitchRequest
from control.settings import Settings
from tests.conftest import Api, make_settings, serve_api
from tests.gateway.teams_support import agents, script, team
from tests.gateway.test_agents_api import agent_body, created_running, wait_status
from tests.gateway.test_tasks_api import running_agent, start_task
from tests.support.consul_double import ConsulDouble, nomad_service
from tests.support.helpers import assert_eventually, hold_first_call, now

SLOW = {"provider": "replay", "name": "slow", "responses": ["never said"], "delay_ms": 120_000}


async def slow_agent(api: Api, headers: dict[str, str], name: str) -> dict[str, Any]:
    return await running_agent(api, headers, name=name, model=SLOW, tools=[])


async def task_status(api: Api, headers: dict[str, str], task_id: str) -> dict[str, Any]:
    return dict((await api.client.get(f"/v1/tasks/{task_id}", headers=headers)).json())


async def running_task(api: Api, headers: dict[str, str], agent_id: str) -> str:
    task_id = await start_task(api, headers, agent_id, "take your time")
    await assert_eventually(lambda: task_status(api, headers, task_id), lambda t: t["status"] == "running")
    return task_id


async def killswitch(api: Api, **body: Any) -> dict[str, Any]:
    response = await api.client.post("/v1/admin/killswitch", json=body, headers=await api.admin())
    assert response.status_code == 200, response.text
    return dict(response.json())


@pytest.fixture
async def fleet(api: Api) -> dict[str, Any]:
    """Customer A with two agents, customer B with one; each agent busy with a slow model call."""
    a_id, a = await api.new_customer("a")
    b_id, b = await api.new_customer("b")
    agents = {
        "a1": await slow_agent(api, a, "a1"),
        "a2": await slow_agent(api, a, "a2"),
        "b1": await slow_agent(api, b, "b1"),
    }
    headers = {"a1": a, "a2": a, "b1": b}
    tasks = {name: await running_task(api, headers[name], agent["id"]) for name, agent in agents.items()}
    return {"a": a_id, "b": b_id, "agents": agents, "headers": headers, "tasks": tasks}


async def assert_halted(api: Api, fleet: dict[str, Any], halted: set[str], reason: str) -> None:
    for name, agent in fleet["agents"].items():
        headers = fleet["headers"][name]
        if name in halted:
            task = await assert_eventually(
                lambda n=name, h=headers: task_status(api, h, fleet["tasks"][n]), lambda t: t["status"] == "killed"
            )
            assert reason in (task["status_reason"] or "")
            status = await wait_status(api, headers, agent["id"], "killed")
            assert reason in status["status_reason"]
        else:
            assert (await task_status(api, headers, fleet["tasks"][name]))["status"] == "running", name
            current = (await api.client.get(f"/v1/agents/{agent['id']}", headers=headers)).json()
            assert current["status"] == "running", name


async def test_agent_scope_halts_exactly_that_agent_and_release_resumes_it(api: Api, fleet: dict[str, Any]) -> None:
    a1 = fleet["agents"]["a1"]
    statuses: list[Event] = []  # what `nats sub 'caravan.events.>'` shows of the agent's status

    async def hear(msg: Msg) -> None:
        if (event := Event.model_validate_json(msg.data)).kind == AgentEventKind.STATUS:
            statuses.append(event)

    sub = await api.control.jet.nc.subscribe(agent_events_subject(fleet["a"], a1["id"]), cb=hear)
    result = await killswitch(api, scope="agent", agent_id=a1["id"], engaged=True, reason="runaway loop")
    assert (result["covered"], result["acknowledged"], result["unacknowledged"]) == (1, 1, [])
    await assert_halted(api, fleet, {"a1"}, "runaway loop")
    body = {"agent_id": a1["id"], "task": "x"}
    refused = await api.client.post("/v1/tasks", json=body, headers=fleet["headers"]["a1"])
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "killswitch_engaged"
    error = refused.json()["error"]
    assert "runaway loop" in error["message"] and a1["id"] in error["message"]
    assert error["details"] == {"scope": "agent", "target": a1["id"], "reason": "runaway loop"}

    released = await killswitch(api, scope="agent", agent_id=a1["id"], engaged=False, reason="fixed")
    assert (released["acknowledged"], released["unacknowledged"]) == (1, [])
    await wait_status(api, fleet["headers"]["a1"], a1["id"], "running")
    await running_task(api, fleet["headers"]["a1"], a1["id"])  # accepts work again
    said = await assert_eventually(
        now(lambda: [(e.data["was"], e.content, e.data["reason"]) for e in statuses]), lambda said: len(said) >= 2
    )
    await sub.unsubscribe()
    halted = "killswitch engaged (agent: runaway loop)"
    assert said == [("running", "killed", halted), ("killed", "running", None)], said


async def test_a_task_queued_behind_a_halted_agents_runs_stays_queued_and_a_cancel_ends_it_at_once(api: Api) -> None:
    """An agent halted with every slot busy and a task waiting behind: its runs end `killed`, and the slots they
    free do not fetch the waiting task (the halted agent fetched it and gave it back, so that it counted as handed
    out, and its cancel waited the full deadline: "its agent did not stop it within 60 s")."""
    _, headers = await api.new_customer()
    agent = await slow_agent(api, headers, "busy")
    running = [
        await running_task(api, headers, agent["id"])
        for _ in range(AgentDefinition.model_fields["max_concurrent_tasks"].default)
    ]
    waiting = await start_task(api, headers, agent["id"], "after the others")
    await killswitch(api, scope="agent", agent_id=agent["id"], engaged=True, reason="drill")
    for task_id in running:
        await assert_eventually(lambda t=task_id: task_status(api, headers, t), lambda t: t["status"] == "killed")
    await assert_eventually(  # the killed runs acknowledged; the waiting request never fetched, nor given back
        lambda: api.control.jet.js.consumer_info(TASKS_STREAM, consumer_name(agent["id"])),
        lambda q: (q.num_ack_pending, q.num_pending, q.num_redelivered) == (0, 1, 0),
    )

    assert (await api.client.post(f"/v1/tasks/{waiting}/cancel", headers=headers)).status_code == 202
    task = await assert_eventually(
        lambda: task_status(api, headers, waiting), lambda t: t["status"] != "queued", within=90
    )  # ended by the cancel itself, the request being still in the queue, not by the cancel's deadline
    assert (task["status"], task["status_reason"], task["attempt"]) == ("cancelled", "cancelled on request", 1), task


async def test_customer_scope_halts_that_customers_agents_only(api: Api, fleet: dict[str, Any]) -> None:
    result = await killswitch(api, scope="customer", customer_id=fleet["a"], reason="unpaid invoice")
    assert (result["covered"], result["acknowledged"]) == (2, 2)
    await assert_halted(api, fleet, {"a1", "a2"}, "unpaid invoice")


async def test_all_scope_halts_everyone_and_is_listed_and_audited(api: Api, fleet: dict[str, Any]) -> None:
    result = await killswitch(api, scope="all", reason="incident 42")
    assert (result["covered"], result["acknowledged"], result["unacknowledged"]) == (3, 3, [])
    await assert_halted(api, fleet, {"a1", "a2", "b1"}, "incident 42")
    engaged = (await api.client.get("/v1/admin/killswitch", headers=await api.admin())).json()
    assert [(f["scope"], f["reason"], f["by"]) for f in engaged] == [("all", "incident 42", engaged[0]["by"])]
    assert engaged[0]["by"].startswith("admin:")
    audit = (await api.client.get("/v1/admin/audit?action=killswitch.engage", headers=await api.admin())).json()
    assert audit[-1]["details"]["acknowledged"] == 3 and audit[-1]["details"]["reason"] == "incident 42"
    await killswitch(api, scope="all", engaged=False, reason="resolved")
    for name, agent in fleet["agents"].items():
        await wait_status(api, fleet["headers"][name], agent["id"], "running")
    records = (await api.client.get("/v1/admin/audit", headers=await api.admin())).json()
    actions = [r["action"] for r in records if r["action"].startswith("killswitch.")]
    assert actions[-2:] == ["killswitch.engage", "killswitch.release"]


async def test_releasing_what_is_not_engaged_says_so_at_once_and_is_audited(api: Api) -> None:
    customer_id, headers = await api.new_customer()
    agent = await slow_agent(api, headers, "idle")
    scope = {"scope": "customer", "customer_id": customer_id}
    await killswitch(api, **scope, reason="drill")
    released = await killswitch(api, **scope, engaged=False)
    assert (released["nothing_to_release"], released["acknowledged"], released["unacknowledged"]) == (False, 1, [])
    await wait_status(api, headers, agent["id"], "running")
    for target in (scope, {"scope": "all"}):  # the agent has nothing to acknowledge: it is not waited for
        again = await killswitch(api, **target, engaged=False)
        assert (again["nothing_to_release"], again["covered"], again["unacknowledged"]) == (True, 0, [])
    params = {"action": "killswitch.release"}
    audit = (await api.client.get("/v1/admin/audit", params=params, headers=await api.admin())).json()
    assert [(r["result"], r["target"], r["details"]["nothing_to_release"]) for r in audit] == [
        ("ok", customer_id, False),
        ("ok", customer_id, True),
        ("ok", "all", True),
    ]


async def flags_listed(api: Api) -> list[dict[str, Any]]:
    listed = await api.client.get("/v1/admin/killswitch", headers=await api.admin())
    assert listed.status_code == 200, listed.text
    return list(listed.json())


async def test_deleting_an_agent_releases_the_flag_on_it_alone_and_says_who(api: Api) -> None:
    """A flag on a deleted agent halts nothing; it was left listed, counted as engaged, and could not be released
    (its agent: 404). The customer's flag over the same agent stays."""
    customer_id, headers = await api.new_customer()
    agent = await slow_agent(api, headers, "doomed")
    await killswitch(api, scope="agent", agent_id=agent["id"], reason="runaway loop")
    await killswitch(api, scope="customer", customer_id=customer_id, reason="unpaid")
    assert (await api.client.delete(f"/v1/agents/{agent['id']}", headers=headers)).status_code in (200, 202, 204)

    assert [(f["scope"], f["target"]) for f in await flags_listed(api)] == [("customer", customer_id)]
    params = {"action": "killswitch.release", "actor": "system:agent-deleted"}
    audit = (await api.client.get("/v1/admin/audit", params=params, headers=await api.admin())).json()
    assert [(r["result"], r["target"], r["customer_id"], r["details"]["reason"]) for r in audit] == [
        ("ok", agent["id"], customer_id, "agent deleted")
    ]


async def test_a_flag_left_on_an_agent_that_is_gone_can_be_released(api: Api) -> None:
    """As a flag stored while its agent was being deleted, or by a version before the release on delete: the
    release goes, and is audited; an agent that never existed is still 404, to engage or to release."""
    flags = create_flags(api.control.settings, api.control.jet.nc)
    await flags.start()
    try:
        await flags.put(Flag(scope=Scope.AGENT, target="ag-0123456789ab", reason="left behind", id="old"))
    finally:
        await flags.stop()
    released = await killswitch(api, scope="agent", agent_id="ag-0123456789ab", engaged=False, reason="cleanup")
    assert (released["engaged"], released["nothing_to_release"], released["covered"]) == (False, False, 0)
    assert await flags_listed(api) == []
    for engaged in (False, True):  # no flag is left to release; and none may be engaged on no agent
        body = {"scope": "agent", "agent_id": "ag-0123456789ab", "engaged": engaged, "reason": "x"}
        refused = await api.client.post("/v1/admin/killswitch", json=body, headers=await api.admin())
        assert refused.status_code == 404, refused.text
    audit = (await api.client.get("/v1/admin/audit?action=killswitch.release", headers=await api.admin())).json()
    assert [(r["result"], r["target"]) for r in audit] == [("ok", "ag-0123456789ab"), ("failed", "ag-0123456789ab")]


async def test_hard_stops_the_jobs(api: Api, fleet: dict[str, Any]) -> None:
    b1 = fleet["agents"]["b1"]
    result = await killswitch(api, scope="agent", agent_id=b1["id"], reason="abuse", hard=True)
    assert result["stopped"] == [b1["id"]]
    status = await api.control.scheduler.job_status(b1["namespace"], b1["job_id"])
    assert status is not None and set(status.allocs.values()) == {"stopped"}
    agent = (await api.client.get(f"/v1/agents/{b1['id']}", headers=fleet["headers"]["b1"])).json()
    assert agent["status"] == "killed"


async def test_hard_with_a_job_that_cannot_be_stopped_stops_the_rest_and_says_the_flag_is_engaged(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    customer_id, headers = await api.new_customer()
    stuck, fine = [await running_agent(api, headers, name=name) for name in ("stuck", "fine")]
    scheduler = api.control.scheduler
    stop_job = scheduler.stop_job

    async def failing(namespace: str, job_id: str) -> None:
        if job_id == stuck["job_id"]:
            raise SchedulerError("the scheduler is unreachable")
        await stop_job(namespace, job_id)

    monkeypatch.setattr(scheduler, "stop_job", failing)
    admin = await api.admin()
    body = {"scope": "customer", "customer_id": customer_id, "reason": "abuse", "hard": True}
    response = await api.client.post("/v1/admin/killswitch", json=body, headers=admin)
    assert response.status_code == 502, response.text
    error = response.json()["error"]
    assert error["code"] == "jobs_not_stopped"
    assert "killswitch engaged" in error["message"] and "1 of 2 jobs could not be stopped" in error["message"]
    assert stuck["id"] in error["message"]
    assert error["details"]["stopped"] == [fine["id"]] and list(error["details"]["not_stopped"]) == [stuck["id"]]
    engaged = (await api.client.get("/v1/admin/killswitch", headers=admin)).json()
    assert [(f["scope"], f["target"]) for f in engaged] == [("customer", customer_id)]
    status = await scheduler.job_status(fine["namespace"], fine["job_id"])
    assert status is not None and set(status.allocs.values()) == {"stopped"}
    (record,) = (await api.client.get("/v1/admin/audit?action=killswitch.engage", headers=admin)).json()
    assert (record["result"], record["customer_id"]) == ("failed", customer_id)
    assert record["details"]["flag_id"] == engaged[0]["id"] and record["details"]["stopped"] == [fine["id"]]
    assert list(record["details"]["not_stopped"]) == [stuck["id"]]
    assert record["details"]["error"]["message"] == error["message"]


async def test_a_control_plane_started_under_a_hard_flag_runs_none_of_what_it_covers(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with ControlPlane(settings) as control, serve_api(control) as api:
        customer_id, headers = await api.new_customer()
        agent = await running_agent(api, headers)

        async def unreachable(namespace: str, job_id: str) -> None:
            raise SchedulerError("the scheduler is unreachable")

        monkeypatch.setattr(control.scheduler, "stop_job", unreachable)
        body = {"scope": "customer", "customer_id": customer_id, "reason": "abuse", "hard": True, "wait_ms": 0}
        response = await api.client.post("/v1/admin/killswitch", json=body, headers=await api.admin())
        assert response.status_code == 502, response.text  # engaged; the job still meant to run
    # started again (the local scheduler's jobs went with it): it must come up, and not run the agent again
    async with ControlPlane(settings) as control, serve_api(control) as api:
        after = (await api.client.get(f"/v1/agents/{agent['id']}", headers=headers)).json()
        assert (after["desired"], after["status"]) == ("stopped", "killed"), after
        assert await control.scheduler.job_status(agent["namespace"], agent["job_id"]) is None


async def test_a_flag_that_is_not_json_true_or_false_is_refused_and_nothing_is_engaged(api: Api) -> None:
    """``"engaged": "yes"`` was taken for true, and ``"false"``, a string, too: a switch is JSON's true or false,
    and its wait JSON's integer."""
    admin = await api.admin()
    wrong = (("engaged", "yes"), ("engaged", "false"), ("engaged", 1), ("hard", "true"), ("wait_ms", "100"))
    for field, value in (*wrong, ("wait_ms", 100.0), ("wait_ms", True)):
        body = {"scope": "all", "reason": "typo", field: value}
        response = await api.client.post("/v1/admin/killswitch", json=body, headers=admin)
        assert response.status_code == 422, (field, value, response.text)
        assert [d["field"] for d in response.json()["error"]["details"]] == [field]
    assert (await api.client.get("/v1/admin/killswitch", headers=admin)).json() == []


async def test_an_agent_scope_engagement_is_audited_under_the_agents_customer(api: Api) -> None:
    customer_id, headers = await api.new_customer()
    made = await api.client.post("/v1/agents", json=agent_body(), headers=headers)
    assert made.status_code == 201, made.text
    agent_id = made.json()["id"]
    await killswitch(api, scope="agent", agent_id=agent_id, reason="quarantine", wait_ms=0)
    await killswitch(api, scope="agent", agent_id=agent_id, engaged=False, wait_ms=0)
    params = {"customer_id": customer_id}
    records = (await api.client.get("/v1/admin/audit", params=params, headers=await api.admin())).json()
    killswitch_records = [(r["action"], r["target"]) for r in records if r["action"].startswith("killswitch.")]
    assert killswitch_records == [("killswitch.engage", agent_id), ("killswitch.release", agent_id)]


async def test_an_agent_restarted_under_an_engaged_flag_stays_halted(api: Api) -> None:
    _, headers = await api.new_customer()
    agent = await running_agent(api, headers)
    await killswitch(api, scope="agent", agent_id=agent["id"], reason="quarantine")
    assert (await api.client.post(f"/v1/agents/{agent['id']}/stop", headers=headers)).status_code == 200
    # a soft killswitch stops no job, nor refuses a start: the agent starts, halted
    assert (await api.client.post(f"/v1/agents/{agent['id']}/start", headers=headers)).status_code == 200
    restarted = await wait_status(api, headers, agent["id"], "killed")
    assert "quarantine" in restarted["status_reason"]
    assert restarted["scheduler"]["alloc_ids"] != agent["scheduler"]["alloc_ids"]


@pytest.mark.parametrize("scope", ["agent", "customer", "all"])
async def test_what_a_hard_killswitch_stopped_its_owner_cannot_start_until_it_is_released(api: Api, scope: str) -> None:
    customer_id, headers = await api.new_customer()
    agent = await running_agent(api, headers)
    target = {"agent": {"agent_id": agent["id"]}, "customer": {"customer_id": customer_id}, "all": {}}[scope]
    result = await killswitch(api, scope=scope, reason="abuse", hard=True, **target)
    assert result["stopped"] == [agent["id"]]

    refused = await api.client.post(f"/v1/agents/{agent['id']}/start", headers=headers)
    assert refused.status_code == 409, refused.text
    error = refused.json()["error"]
    assert error["code"] == "killswitch_engaged" and "hard killswitch" in error["message"]
    assert "abuse" in error["message"] and error["details"]["scope"] == scope
    current = (await api.client.get(f"/v1/agents/{agent['id']}", headers=headers)).json()
    assert (current["desired"], current["status"]) == ("stopped", "killed")
    assert (await api.client.get("/v1/usage", headers=headers)).json()["cpu"] == 0
    status = await api.control.scheduler.job_status(agent["namespace"], agent["job_id"])
    assert status is not None and set(status.allocs.values()) == {"stopped"}
    if scope != "agent":  # nor can a new agent run under it
        created = await api.client.post("/v1/agents", json=agent_body(name="another"), headers=headers)
        assert created.status_code == 409 and created.json()["error"]["code"] == "killswitch_engaged"
        message = created.json()["error"]["message"]  # naming no agent: none was stored to be looked up
        assert "no agent can be created" in message and "abuse" in message and " ag-" not in message
        assert [a["id"] for a in (await api.client.get("/v1/agents", headers=headers)).json()] == [agent["id"]]

    await killswitch(api, scope=scope, engaged=False, reason="resolved", **target)
    started = await api.client.post(f"/v1/agents/{agent['id']}/start", headers=headers)
    assert started.status_code == 200, started.text
    await wait_status(api, headers, agent["id"], "running")


async def test_a_hard_killswitch_does_not_wait_for_a_change_under_way(api: Api) -> None:
    customer_id, headers = await api.new_customer()
    agent = await running_agent(api, headers)
    dead = ChangeLease(owner="a control plane that died", until=utcnow() + timedelta(seconds=120))
    await api.control.agents._repo.update(  # type: ignore[attr-defined]
        f"{customer_id}.{agent['id']}", lambda a: a.model_copy(update={"lease": dead})
    )
    result = await killswitch(api, scope="customer", customer_id=customer_id, reason="abuse", hard=True, wait_ms=0)
    assert result["stopped"] == [agent["id"]], result  # at once: it answered 502 "busy" after 30 s
    status = await api.control.scheduler.job_status(agent["namespace"], agent["job_id"])
    assert status is not None and set(status.allocs.values()) == {"stopped"}


async def test_a_creation_that_a_hard_killswitch_overtakes_leaves_nothing(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    customer_id, headers = await api.new_customer()
    # the creation has found no flag and waits before its quota reservation until the killswitch has engaged
    create_waits = hold_first_call(
        monkeypatch, (api.control.quotas, "reserve_agent"), until=(api.control.killswitch, "apply")
    )
    create = asyncio.create_task(api.client.post("/v1/agents", json=agent_body(), headers=headers))
    await create_waits.wait()
    await killswitch(api, scope="customer", customer_id=customer_id, reason="abuse", hard=True, wait_ms=0)
    refused = await create
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "killswitch_engaged", refused.text
    assert "no agent can be created" in refused.json()["error"]["message"]
    assert " ag-" not in refused.json()["error"]["message"]
    assert (await api.client.get("/v1/agents", headers=headers)).json() == []
    assert (await api.client.get("/v1/usage", headers=headers)).json()["agents"] == 0
    assert api.control.scheduler._jobs == {}  # type: ignore[attr-defined]


async def test_a_killswitch_call_cancelled_after_its_flag_is_written_is_audited(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    customer_id, headers = await api.new_customer()
    await running_agent(api, headers)
    reached = asyncio.Event()

    async def stuck(covered: list[Any]) -> dict[str, set[str]]:  # the flag is written by now
        reached.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    monkeypatch.setattr(api.control.killswitch, "_expected_instances", stuck)
    principal = Principal(Role.ADMIN, None, "admin:test")
    request = KillswitchRequest(scope=Scope.CUSTOMER, customer_id=customer_id, reason="abuse")
    call = asyncio.create_task(api.control.killswitch.apply(principal, request))
    await reached.wait()
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    audit = await api.client.get("/v1/admin/audit", params={"action": "killswitch.engage"}, headers=await api.admin())
    (record,) = [r for r in audit.json() if r["customer_id"] == customer_id]
    assert record["result"] == "failed" and record["details"]["error"]["code"] == "cancelled", record
    assert record["details"]["flag_id"]  # the flag it wrote stays engaged: the record says which


async def test_a_start_that_a_hard_killswitch_overtakes_does_not_run(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    customer_id, headers = await api.new_customer()
    agent = await created_running(api, headers)
    assert (await api.client.post(f"/v1/agents/{agent['id']}/stop", headers=headers)).status_code == 200
    # the start has found no flag and waits before its quota check until the killswitch has engaged
    start_waits = hold_first_call(
        monkeypatch, (api.control.quotas, "reserve_running"), until=(api.control.killswitch, "apply")
    )
    start = asyncio.create_task(api.client.post(f"/v1/agents/{agent['id']}/start", headers=headers))
    await start_waits.wait()
    await killswitch(api, scope="customer", customer_id=customer_id, reason="abuse", hard=True, wait_ms=0)
    refused = await start
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "killswitch_engaged", refused.text
    current = (await api.client.get(f"/v1/agents/{agent['id']}", headers=headers)).json()
    assert (current["desired"], current["status"]) == ("stopped", "killed")
    assert (await api.client.get("/v1/usage", headers=headers)).json()["cpu"] == 0
    status = await api.control.scheduler.job_status(agent["namespace"], agent["job_id"])
    assert status is not None and set(status.allocs.values()) == {"stopped"}


@pytest.mark.parametrize(
    "body",
    [
        {"scope": "everything"},
        {"scope": "all", "customer_id": "cu-000000000000"},
        {"scope": "customer"},
        {"scope": "agent"},
        {"scope": "all", "engaged": False, "hard": True},
        {"scope": "all", "reason": "x" * 501},
        {"scope": "all", "wait_ms": 60_000},
    ],
)
async def test_bad_killswitch_requests_are_422_and_engage_nothing(api: Api, body: dict[str, Any]) -> None:
    response = await api.client.post("/v1/admin/killswitch", json=body, headers=await api.admin())
    assert response.status_code == 422, response.text
    assert (await api.client.get("/v1/admin/killswitch", headers=await api.admin())).json() == []


async def test_a_reason_that_would_break_the_status_lines_or_hide_text_is_refused(api: Api) -> None:
    admin = await api.admin()
    forged = "drill\nENGAGED all      every agent      by admin:root at 2030-01-01: nothing"
    for reason in (forged, "a\tb", "a\x85b", "a\u2028b", "a\u202eb", "a\u200bb"):
        body = {"scope": "all", "reason": reason, "wait_ms": 0}
        refused = await api.client.post("/v1/admin/killswitch", json=body, headers=admin)
        assert refused.status_code == 422, (reason, refused.text)
        error = refused.json()["error"]
        assert error["code"] == "invalid" and error["details"][0]["field"] == "reason", error
        assert f"U+{ord(next(c for c in reason[1:] if not c.isalnum())):04X}" in error["message"], error
    assert (await api.client.get("/v1/admin/killswitch", headers=admin)).json() == []
    readable = "Wartung: Datenbank 🚧 (ticket #42, «urgent»)"
    await killswitch(api, scope="all", reason=readable, wait_ms=0)
    assert [f["reason"] for f in (await api.client.get("/v1/admin/killswitch", headers=admin)).json()] == [readable]


async def test_unknown_targets_are_404_and_customers_cannot_use_the_killswitch(api: Api) -> None:
    _, customer = await api.new_customer()
    admin = await api.admin()
    unknown = [
        {"scope": "customer", "customer_id": "cu-000000000000", "reason": "r"},
        {"scope": "agent", "agent_id": "ag-000000000000", "reason": "r"},
    ]
    for body in unknown:
        assert (await api.client.post("/v1/admin/killswitch", json=body, headers=admin)).status_code == 404
    assert (await api.client.post("/v1/admin/killswitch", json={"scope": "all"}, headers=customer)).status_code == 403
    assert (await api.client.get("/v1/admin/killswitch", headers=customer)).status_code == 403
    assert (await api.client.get("/v1/admin/killswitch", headers=admin)).json() == []
    failed = (await api.client.get("/v1/admin/audit?action=killswitch.engage", headers=admin)).json()
    assert [(r["result"], r["target"], r["details"]["error"]["code"]) for r in failed] == [
        ("failed", "cu-000000000000", "not_found"),
        ("failed", "ag-000000000000", "not_found"),
    ]


async def test_an_engagement_needs_a_reason_and_never_makes_a_hard_one_soft(api: Api) -> None:
    """``{"scope": "all"}`` alone engaged every agent with no reason, and a soft engagement over a hard one made it
    soft without a word: the owners could start what it had stopped."""
    customer_id, headers = await api.new_customer()
    agent = await running_agent(api, headers)
    admin = await api.admin()
    for body in ({"scope": "all"}, {"scope": "agent", "agent_id": agent["id"], "reason": "  "}):
        refused = await api.client.post("/v1/admin/killswitch", json=body, headers=admin)
        assert refused.status_code == 422 and "needs a reason" in refused.text, refused.text
    assert (await api.client.get("/v1/admin/killswitch", headers=admin)).json() == []
    target = {"scope": "agent", "agent_id": agent["id"]}
    await killswitch(api, **target, reason="abuse", hard=True)
    soft = await api.client.post("/v1/admin/killswitch", json={**target, "reason": "oops"}, headers=admin)
    assert soft.status_code == 409, soft.text
    assert "is hard (abuse, by admin:" in soft.json()["error"]["message"], soft.text
    (flag,) = (await api.client.get("/v1/admin/killswitch", headers=admin)).json()
    assert (flag["hard"], flag["reason"]) == (True, "abuse")
    assert (await api.client.post(f"/v1/agents/{agent['id']}/start", headers=headers)).status_code == 409
    await killswitch(api, **target, reason="still abuse", hard=True)  # hard over hard: its reason changes
    await killswitch(api, **target, engaged=False, reason="resolved")
    await killswitch(api, **target, reason="watching", wait_ms=0)  # soft, once released
    (flag,) = (await api.client.get("/v1/admin/killswitch", headers=admin)).json()
    assert (flag["hard"], flag["reason"]) == (False, "watching")
    records = (await api.client.get("/v1/admin/audit?action=killswitch.engage", headers=admin)).json()
    assert [r["result"] for r in records if r["customer_id"] == customer_id].count("failed") == 1  # the soft one


async def test_with_consul_a_flag_put_by_hand_halts_and_an_outage_fails_safe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ACLs on (default deny), as a production Consul runs: the agents get the platform's token."""
    token = "b1e4-consul-acl-token-for-caravan"
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", token)
    double = ConsulDouble(acl_token=token).start()
    try:
        async with EmbeddedNats(tmp_path / "nats") as nats_server:
            settings = make_settings(
                nats_server.url,
                tmp_path / "data",
                flags="consul",
                consul_http_addr=double.address,
                flags_grace_s=1.5,
                flags_heartbeat_s=0.5,
            )
            control = ControlPlane(settings)
            async with control, serve_api(control) as api:
                _, headers = await api.new_customer()
                agent = await running_agent(api, headers)
                # the local scheduler registered it in Consul, its check critical until the first pass
                await assert_eventually(
                    control.registry.instances, lambda found: [i.meta["caravan_agent"] for i in found] == [agent["id"]]
                )

                # `consul kv put caravan/killswitch/agent/<id> "maintenance"`
                consul_http = httpx.AsyncClient(base_url=f"http://{double.address}", headers={"X-Consul-Token": token})
                async with consul_http as consul:
                    await consul.put(f"/v1/kv/caravan/killswitch/agent/{agent['id']}", content=b"maintenance")
                    halted = await wait_status(api, headers, agent["id"], "killed")
                    assert "maintenance" in halted["status_reason"]
                    listed = (await api.client.get("/v1/admin/killswitch", headers=await api.admin())).json()
                    assert [(f["scope"], f["target"], f["reason"]) for f in listed] == [
                        ("agent", agent["id"], "maintenance")
                    ]
                    await consul.delete(f"/v1/kv/caravan/killswitch/agent/{agent['id']}")
                await wait_status(api, headers, agent["id"], "running")

                with double.down():
                    failed_safe = await wait_status(api, headers, agent["id"], "killed")
                    assert "unreachable" in failed_safe["status_reason"]
                    assert "fail safe" in failed_safe["status_reason"]
                await wait_status(api, headers, agent["id"], "running")
    finally:
        double.stop()


async def test_with_consul_an_agent_that_nomad_registered_acknowledges_as_itself(tmp_path: Path) -> None:
    """On Nomad the job's service block registers each allocation in Consul under Nomad's own ID for it
    (``_nomad-task-<alloc id>-group-agent-<service>-health``): the agent's acknowledgement, which names its
    allocation, answers for that instance."""
    double = ConsulDouble().start()
    try:
        async with EmbeddedNats(tmp_path / "nats") as nats_server:
            settings = make_settings(
                nats_server.url, tmp_path / "data", flags="consul", consul_http_addr=double.address
            )
            control = ControlPlane(settings)
            async with control, serve_api(control) as api:
                _, headers = await api.new_customer()
                agent = await running_agent(api, headers)
                [instance] = await assert_eventually(control.registry.instances, lambda found: len(found) == 1)
                # the same allocation as a Nomad client registers it (the local scheduler names it by its ID)
                await control.registry.deregister(instance.name, instance.id)
                registration = nomad_service(instance.id, instance.name, instance.port, instance.meta)
                async with httpx.AsyncClient(base_url=f"http://{double.address}") as consul:
                    registered = await consul.put("/v1/agent/service/register", json=registration)
                    assert registered.status_code == 200, registered.text
                assert [i.meta["caravan_agent"] for i in await control.registry.instances()] == [agent["id"]]

                engaged = await killswitch(api, scope="agent", agent_id=agent["id"], reason="maintenance")
                assert (engaged["covered"], engaged["acknowledged"], engaged["unacknowledged"]) == (1, 1, [])
                await wait_status(api, headers, agent["id"], "killed")
    finally:
        double.stop()


async def test_a_team_task_is_refused_naming_the_member_a_killswitch_halts(api: Api) -> None:
    customer_id, headers = await api.new_customer("crew")
    made = await agents(api, headers, {"writer": {"model": script("a")}, "critic": {"model": script("b")}})
    crew = await team(api, headers, members=[a["id"] for a in made.values()], termination={"max_messages": 2})
    critic = made["critic"]
    await killswitch(api, scope="agent", agent_id=critic["id"], reason="loops on tools", wait_ms=0)

    refused = await api.client.post("/v1/tasks", json={"team_id": crew["id"], "task": "go"}, headers=headers)
    assert refused.status_code == 409, refused.text
    error = refused.json()["error"]
    assert error["code"] == "killswitch_engaged" and critic["id"] in error["message"]
    assert error["details"] == {"scope": "agent", "target": critic["id"], "reason": "loops on tools"}
    assert (await api.client.get("/v1/tasks", headers=headers)).json() == []  # nothing queued
    assert await api.control.quotas.tasks_in_flight(customer_id) == []  # nor a slot held
