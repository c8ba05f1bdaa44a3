"""Agents on Nomad through the real control plane (AgentService, NATS) with the Nomad scheduler: what an agent
shows when Nomad cannot place it or its task keeps crashing, PATCH as a new job version, and hostile input."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.protocol import ModelConfig
from control.backends.base import AllocState, SchedulerUnreachable
from control.errors import Conflict
from control.models import Agent, AgentCreate, AgentStatus, AgentUpdate, Resources, TaskCreate
from control.natsio import connect
from control.natsserver import EmbeddedNats
from control.platform import ControlPlane
from control.store import Repo
from tests.conftest import Api, NomadTarget, consul_env, make_settings, serve_api
from tests.gateway.test_metrics import parse
from tests.support.helpers import assert_eventually
from tests.support.nomad_double import Healthy, NomadDouble

HOSTILE = 'quote " ${NOMAD_TOKEN} {{ with nomadVar "nomad/jobs" }}{{ end }} [[ job_id ]]\nnewline'


def definition(**changes: Any) -> AgentCreate:
    base: dict[str, Any] = {
        "name": "helper",
        "system_message": "You help.",
        "model": ModelConfig(provider="replay", name="scripted", responses=["ok"]),
    }
    base.update(changes)
    return AgentCreate(**base)


async def _control(target: NomadTarget, nats: EmbeddedNats, data: Path, **settings: Any) -> ControlPlane:
    """A control plane whose scheduler is the one its settings make (``CARAVAN_SCHEDULER=nomad``)."""
    values = make_settings(
        nats.url,
        data,
        scheduler="nomad",
        nomad_addr=target.address,
        nomad_token=target.token,
        agent_restart_attempts=1,
        **settings,
    )
    return ControlPlane(values)


@pytest.fixture
async def plane(nomad_target: NomadTarget, nats_server: EmbeddedNats, tmp_path: Path) -> AsyncIterator[ControlPlane]:
    async with await _control(nomad_target, nats_server, tmp_path / "data") as control:
        yield control


async def _customer(control: ControlPlane) -> str:
    customer, _ = await control.auth.create_customer("acme")
    return customer.id


async def _registered(target: NomadTarget, agent: Agent) -> dict[str, Any]:
    headers = {"X-Nomad-Token": target.token} if target.token else {}
    async with httpx.AsyncClient(base_url=target.address, headers=headers) as http:
        response = await http.get(f"/v1/job/{agent.job_id}", params={"namespace": agent.namespace})
    assert response.status_code == 200, response.text
    job: dict[str, Any] = response.json()
    return job


async def _variable_items(target: NomadTarget, agent: Agent) -> dict[str, str]:
    """What the agent's task gets as its secrets: the items of its job's Variable."""
    headers = {"X-Nomad-Token": target.token} if target.token else {}
    async with httpx.AsyncClient(base_url=target.address, headers=headers) as http:
        response = await http.get(f"/v1/var/nomad/jobs/{agent.job_id}", params={"namespace": agent.namespace})
    assert response.status_code == 200, response.text
    items: dict[str, str] = response.json()["Items"]
    return items


async def _settled(control: ControlPlane, agent: Agent, status: AgentStatus, within: float = 20) -> Agent:
    return await assert_eventually(
        lambda: control.agents.get(None, agent.id), lambda a: a.status == status, within=within, what=str(status)
    )


async def test_an_agent_nomad_cannot_place_fails_with_nomads_explanation(plane: ControlPlane) -> None:
    customer = await _customer(plane)
    agent = await plane.agents.create(customer, definition(resources=Resources(cpu=16_000, memory_mb=65_536)))
    failed = await _settled(plane, agent, AgentStatus.FAILED)
    assert failed.status_reason is not None
    assert failed.status_reason.startswith('Nomad could not place the job: Task Group "agent"')
    assert "exhausted on 1 nodes" in failed.status_reason
    assert failed.scheduler["job_id"] == agent.job_id and failed.scheduler["eval_id"]
    await plane.agents.delete(customer, agent.id)


async def test_an_agent_nomad_registered_but_could_not_answer_for_runs_on(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    """Nomad registered the agent's job, then answered 500 for its evaluation (as while it elects a leader): the
    job runs, so the agent is not failed and keeps its quota; its allocation's state comes from the event stream.
    Against the double only: a real Nomad cannot be made to fail these reads on demand."""
    with NomadDouble() as double:
        target = NomadTarget(double.address, None, double)
        async with await _control(target, nats_server, tmp_path / "data") as control:
            customer = await _customer(control)
            with double.failing("eval_get"):
                agent = await control.agents.create(customer, definition())
            assert agent.status is AgentStatus.STARTING, agent.status_reason
            assert agent.scheduler["eval_id"] and agent.scheduler["alloc_ids"] == []
            assert (await control.quotas.usage(customer)).cpu == agent.resources.cpu * agent.replicas  # still held
            await assert_eventually(
                lambda: control.scheduler.job_status(agent.namespace, agent.job_id),
                lambda s: s is not None and list(s.allocs.values()) == [AllocState.RUNNING],
                what="the job's allocation running",
            )
            assert (await control.agents.get(customer, agent.id)).status is AgentStatus.STARTING  # until it is ready
            await control.agents.delete(customer, agent.id)


async def _running(control: ControlPlane, agent: Agent) -> None:
    await assert_eventually(
        lambda: control.scheduler.job_status(agent.namespace, agent.job_id),
        lambda s: s is not None and list(s.allocs.values()) == [AllocState.RUNNING],
        what=f"agent {agent.id}'s allocation running",
    )


async def _agents_on_a_nomad_that_lost_them(nats_server: EmbeddedNats, data: Path, count: int) -> list[Agent]:
    """``count`` agents created on a Nomad that is then gone with their jobs (as a dev agent that restarted)."""
    with NomadDouble() as double:
        async with await _control(NomadTarget(double.address, None, double), nats_server, data) as control:
            customer = await _customer(control)
            return [await control.agents.create(customer, definition()) for _ in range(count)]


async def test_a_restart_puts_back_every_agent_but_the_one_nomad_fails_which_says_why(
    nats_server: EmbeddedNats, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The control plane restarts on a Nomad that knows none of its agents' jobs and answers 500 for the first
    one's: that agent is left failed, saying why (in its status and the log), holding no quota, until it is
    started again; the agents after it are put back all the same, and the start goes on. Against the double only:
    a real Nomad cannot be made to fail one job's reads on demand."""
    data = tmp_path / "data"
    broken, *others = await _agents_on_a_nomad_that_lost_them(nats_server, data, 3)
    customer = broken.customer_id
    with NomadDouble() as double:
        control = await _control(NomadTarget(double.address, None, double), nats_server, data)
        try:
            with double.failing("job_get", message="rpc error: state store closed", job=broken.job_id):
                await control.start()
            failed = await control.agents.get(customer, broken.id)
            assert failed.status is AgentStatus.FAILED
            assert failed.status_reason == (
                "could not be put back after the control plane restarted: "
                f"read job {broken.job_id}: 500 rpc error: state store closed"
            )
            assert any(broken.id in r.getMessage() and "state store closed" in r.getMessage() for r in caplog.records)
            with pytest.raises(Conflict, match=r"could not be put back.*start it again"):
                await control.tasks.create(customer, TaskCreate(agent_id=broken.id, task="hello"))
            for agent in others:
                assert (await control.agents.get(customer, agent.id)).status is AgentStatus.STARTING
                await _running(control, agent)
            assert (await control.quotas.usage(customer)).cpu == sum(a.resources.cpu for a in others)
            started = await control.agents.start(customer, broken.id)
            assert (started.status, started.status_reason) == (AgentStatus.STARTING, None)
            await _running(control, broken)
        finally:
            await control.stop()


async def test_a_restart_on_a_nomad_that_cannot_answer_fails_and_leaves_the_agents_for_the_next_start(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    """The control plane restarts on a Nomad that answers "500 No cluster leader" to every read of a job, after its
    retries: the start fails, saying so (and stops what it started), and no agent is failed for it: they are left
    meant to run, as they were, and the next start puts them back. Against the double only: a real Nomad cannot be
    made to fail on demand."""
    data = tmp_path / "data"
    agents = await _agents_on_a_nomad_that_lost_them(nats_server, data, 2)
    with NomadDouble() as double:
        target = NomadTarget(double.address, None, double)
        control = await _control(target, nats_server, data)
        with double.failing("job_get"), pytest.raises(SchedulerUnreachable, match="No cluster leader"):
            await control.start()
        assert not control.ready
        jet = await connect(nats_server.url)
        try:
            for agent in agents:  # as stored
                found = await Repo(jet.kv["agents"], Agent).find(agent.id)
                assert found is not None
                _, left = found
                assert (left.desired, left.status, left.status_reason) == ("running", AgentStatus.STARTING, None)
        finally:
            await jet.close()
        async with await _control(target, nats_server, data) as control:
            for agent in agents:
                await _running(control, agent)


async def test_a_crash_looping_agent_fails_with_the_tasks_last_words(
    nomad_target: NomadTarget, nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    async with await _control(nomad_target, nats_server, tmp_path / "data", agent_python="/bin/false") as control:
        customer = await _customer(control)
        agent = await control.agents.create(customer, definition())
        failed = await _settled(control, agent, AgentStatus.FAILED, within=60 if nomad_target.real else 20)
        assert failed.status_reason is not None and "Exit Code: 1" in failed.status_reason
        assert "Exceeded allowed attempts 1" in failed.status_reason
        await control.agents.delete(customer, agent.id)


async def test_an_agent_nomad_places_again_after_it_failed_shows_why_and_takes_tasks_again(
    nomad_target: NomadTarget, nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    """The job's reschedule policy (without limit, from 30 s, doubling) has Nomad place a failed allocation
    again: the agent goes from `failed` to `starting`, saying so, and is refused tasks only while failed. Against
    the double the new allocation runs (a real Nomad's crashes again: the agent runs /bin/false)."""
    async with await _control(nomad_target, nats_server, tmp_path / "data", agent_python="/bin/false") as control:
        customer = await _customer(control)
        agent = await control.agents.create(customer, definition())
        await _settled(control, agent, AgentStatus.FAILED, within=60 if nomad_target.real else 20)
        if nomad_target.double is not None:
            nomad_target.double.set_behaviour(agent.job_id, Healthy())
        with pytest.raises(Conflict, match="start it again"):
            await control.tasks.create(customer, TaskCreate(agent_id=agent.id, task="hello"))
        again = await _settled(control, agent, AgentStatus.STARTING, within=90 if nomad_target.real else 20)
        assert again.status_reason is not None
        assert re.fullmatch(
            r"Nomad placed it again after allocation [0-9a-f]{8} failed \(reschedule 1\)", again.status_reason
        )
        if nomad_target.double is not None:  # a real Nomad's fails again meanwhile
            task = await control.tasks.create(customer, TaskCreate(agent_id=agent.id, task="hello"))
            assert task.status == "queued"
        await control.agents.delete(customer, agent.id)


async def test_patch_is_a_new_job_version_and_replicas_are_the_group_count(
    nomad_target: NomadTarget, plane: ControlPlane
) -> None:
    customer = await _customer(plane)
    agent = await plane.agents.create(customer, definition())
    first = await _registered(nomad_target, agent)
    updated = await plane.agents.update(customer, agent.id, AgentUpdate(replicas=2, system_message="Be brief."))
    assert updated.scheduler["version"] == first["Version"] + 1
    job = await _registered(nomad_target, agent)
    assert job["Version"] == first["Version"] + 1 and job["TaskGroups"][0]["Count"] == 2
    assert job["Meta"]["caravan_version"] == str(updated.version)
    await plane.agents.delete(customer, agent.id)
    stopped = await _registered(nomad_target, agent)
    assert stopped["Stop"] is True


CA_CERT = "/etc/consul.d/ca.pem"  # where the client nodes keep Consul's CA, as the control plane's does


@pytest.mark.parametrize(("flags", "provider"), [("natskv", "nomad"), ("consul", "consul")])
async def test_agents_register_in_the_catalog_the_platform_discovers_them_in(
    nomad_target: NomadTarget,
    nats_server: EmbeddedNats,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    flags: str,
    provider: str,
) -> None:
    """With Consul as the registry, the killswitch counts an agent's instances in Consul's catalog: the job's
    service must register there, not in Nomad's own. And the agent reads its flags from that Consul, whose ACLs
    refuse a client without the token: the task gets the platform's token (and TLS settings) in its Variable,
    never in the job."""
    with consul_env("consul-double") as consul:
        for name, value in consul.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("CONSUL_CACERT", CA_CERT)
        async with await _control(nomad_target, nats_server, tmp_path / "data", flags=flags) as control:
            customer = await _customer(control)
            agent = await control.agents.create(customer, definition())
            job = await _registered(nomad_target, agent)
            (service,) = job["TaskGroups"][0]["Services"]
            assert (service["Provider"], service["Name"]) == (provider, f"caravan-agent-{agent.id}")
            items = await _variable_items(nomad_target, agent)
            given = {name: items.get(name) for name in ("CONSUL_HTTP_TOKEN", "CONSUL_CACERT")}
            if flags == "consul":
                assert given == {
                    "CONSUL_HTTP_TOKEN": consul["CONSUL_HTTP_TOKEN"],
                    "CONSUL_CACERT": "/etc/consul.d/ca.pem",
                }
                assert job["TaskGroups"][0]["Tasks"][0]["Env"]["CONSUL_HTTP_ADDR"] == consul["CONSUL_HTTP_ADDR"]
            else:  # the flags are in NATS: Consul's token is nothing the agent needs
                assert given == {"CONSUL_HTTP_TOKEN": None, "CONSUL_CACERT": None}
            assert consul["CONSUL_HTTP_TOKEN"] not in json.dumps(job)
            await control.agents.delete(customer, agent.id)


async def test_a_nats_login_in_the_agents_url_goes_to_the_jobs_variable_not_the_job(
    nomad_target: NomadTarget, nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    """On a NATS of the operator's own, the agents' login is written in CARAVAN_AGENT_NATS_URL: Nomad shows a job to
    every token that may read jobs in its namespace (and Caravan to its customer), so the login goes to the job's
    Variable, beside the other secrets, and the job names the server alone."""
    password = "nats-pw-" + "5" * 16
    login = nats_server.url.replace("nats://", f"nats://operator:{password}@")
    async with await _control(nomad_target, nats_server, tmp_path / "data", agent_nats_url=login) as control:
        customer = await _customer(control)
        agent = await control.agents.create(customer, definition())
        job = await _registered(nomad_target, agent)
        assert job["TaskGroups"][0]["Tasks"][0]["Env"]["NATS_URL"] == nats_server.url
        assert password not in json.dumps(job)
        items = await _variable_items(nomad_target, agent)
        assert (items.get("CARAVAN_NATS_USER"), items.get("CARAVAN_NATS_PASSWORD")) == ("operator", password)
        await control.agents.delete(customer, agent.id)


async def test_hostile_definitions_leave_the_job_unchanged(nomad_target: NomadTarget, plane: ControlPlane) -> None:
    customer = await _customer(plane)
    plain = await plane.agents.create(customer, definition())
    hostile = await plane.agents.create(
        customer,
        definition(system_message=HOSTILE, model=ModelConfig(provider="replay", name="scripted", responses=[HOSTILE])),
    )
    jobs = [await _registered(nomad_target, a) for a in (plain, hostile)]
    texts = [
        json.dumps(j, sort_keys=True).replace(a.id, "<agent>") for j, a in zip(jobs, (plain, hostile), strict=True)
    ]
    volatile = {"SubmitTime", "CreateIndex", "ModifyIndex", "JobModifyIndex", "Status", "Stable", "Version"}
    shapes = [{k: v for k, v in json.loads(t).items() if k not in volatile} for t in texts]
    assert shapes[0] == shapes[1]
    for fragment in ("NOMAD_TOKEN", "[[", "newline", "quote"):
        assert fragment not in texts[1]
    for agent in (plain, hostile):
        await plane.agents.delete(customer, agent.id)


async def test_a_foreign_job_under_the_agents_id_is_left_alone(nomad_target: NomadTarget, plane: ControlPlane) -> None:
    customer = await _customer(plane)
    agent = await plane.agents.create(customer, definition())
    headers = {"X-Nomad-Token": nomad_target.token} if nomad_target.token else {}
    theirs = await _registered(nomad_target, agent)
    theirs = {k: v for k, v in theirs.items() if k not in ("Version", "Stable", "Status", "SubmitTime")}
    theirs["Meta"] = {"team": "payments"}  # someone replaced the job with their own
    async with httpx.AsyncClient(base_url=nomad_target.address, headers=headers) as http:
        response = await http.post(
            f"/v1/job/{agent.job_id}", json={"Job": theirs}, params={"namespace": agent.namespace}
        )
        assert response.status_code == 200, response.text
    before = await _registered(nomad_target, agent)
    updated = await plane.agents.update(customer, agent.id, AgentUpdate(replicas=2))
    assert updated.status == AgentStatus.FAILED and "not owned" in (updated.status_reason or "")
    after = await _registered(nomad_target, agent)
    assert after["Version"] == before["Version"] and after["Meta"] == {"team": "payments"}
    async with httpx.AsyncClient(base_url=nomad_target.address, headers=headers) as http:
        await http.delete(f"/v1/job/{agent.job_id}", params={"namespace": agent.namespace, "purge": "true"})


async def _events_feed(api: Api) -> tuple[dict[str, Any], float | None]:
    """What an operator watches of the scheduler's event feed: ``/readyz`` (which stays 200 for it) and the gauge."""
    ready = await api.client.get("/readyz")
    assert (ready.status_code, ready.json()["status"], ready.json()["scheduler"]) == (200, "ready", "nomad")
    scraped = parse((await api.client.get("/metrics")).text)
    return ready.json()["scheduler_events"], scraped.get(("caravan_scheduler_events_connected", frozenset()))


async def test_readyz_and_metrics_say_the_scheduler_follows_nomads_event_stream(
    nomad_target: NomadTarget, plane: ControlPlane
) -> None:
    async with serve_api(plane) as api:
        events, gauge = await assert_eventually(
            lambda: _events_feed(api), lambda f: f[0]["state"] == "connected", what="connected"
        )
    assert (events["last_error"], events["failed_attempts"], gauge) == (None, 0, 1)
    assert datetime.fromisoformat(events["since"]) <= datetime.now(UTC)


async def test_readyz_and_metrics_say_when_nomads_event_stream_is_lost_and_when_it_is_back(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    """Nomad refuses the event stream (the token's policy lost read-job: 403): the API stays ready and serves, and
    /readyz and /metrics say the feed agents' statuses come from is reconnecting, since when and why, until it is
    back. Against the double only: a real Nomad cannot be made to refuse the stream on demand."""
    with NomadDouble() as double:
        target = NomadTarget(double.address, None, double)
        async with await _control(target, nats_server, tmp_path / "data") as control, serve_api(control) as api:
            connected, _ = await assert_eventually(
                lambda: _events_feed(api), lambda f: f[0]["state"] == "connected", what="connected"
            )
            with double.failing("events", code=403, message="Permission denied"):
                lost, gauge = await assert_eventually(
                    lambda: _events_feed(api),
                    lambda f: f[0]["last_error"] == "unauthorized (403)",
                    what="the refusal reported",
                )
                assert lost["state"] == "reconnecting" and lost["failed_attempts"] >= 1 and gauge == 0
                assert datetime.fromisoformat(lost["since"]) > datetime.fromisoformat(connected["since"])
                assert (await api.client.get("/v1/agents", headers=(await api.new_customer())[1])).status_code == 200
            back, gauge = await assert_eventually(
                lambda: _events_feed(api), lambda f: f[0]["state"] == "connected", what="connected again"
            )
            assert (back["last_error"], back["failed_attempts"], gauge) == (None, 0, 1)
            assert datetime.fromisoformat(back["since"]) > datetime.fromisoformat(lost["since"])


async def test_readyz_tells_anyone_the_kind_of_the_event_streams_failure_and_only_the_log_nomads_words(
    nats_server: EmbeddedNats, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """/readyz answers without authentication: of a failure whose text names the cluster's insides (a server's
    address, as Nomad's RPC errors do) it says the kind only; the log, which the operator reads, has the words.
    Against the double only: a real Nomad cannot be made to fail so on demand."""
    caplog.set_level(logging.INFO, logger="caravan.scheduler.nomad")
    inside = "rpc error: failed to get conn: dial tcp 10.20.30.40:4647: connect: connection refused"
    with NomadDouble() as double:
        target = NomadTarget(double.address, None, double)
        async with await _control(target, nats_server, tmp_path / "data") as control, serve_api(control) as api:
            await assert_eventually(lambda: _events_feed(api), lambda f: f[0]["state"] == "connected", what="connected")
            with double.failing("events", code=500, message=inside):
                ready = await assert_eventually(
                    lambda: api.client.get("/readyz"),
                    lambda r: r.json()["scheduler_events"]["failed_attempts"] >= 2,  # the open stream ended first
                    what="the refused reconnection reported",
                )
    assert (ready.status_code, ready.json()["scheduler_events"]["last_error"]) == (200, "HTTP 500")
    assert "10.20.30.40" not in ready.text and "rpc error" not in ready.text
    assert any(inside in r.getMessage() for r in caplog.records if r.name == "caravan.scheduler.nomad")
