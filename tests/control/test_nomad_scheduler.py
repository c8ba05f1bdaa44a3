"""Contract tests of the Nomad scheduler. Each runs against the Nomad API double and, with NOMAD_ADDR set
(``pytest -m nomad``), against a real Nomad (``nomad agent -dev -config nomad/agent-dev.hcl``): the jobs' tasks
are real commands, and the double reads their ``# nomad-double:`` annotation to behave the same way."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from control.backends import nomad as nomad_backend
from control.backends.base import AllocState, JobNotOwned, JobRejected, SchedulerError, StatusUpdate
from control.backends.nomad import NomadConfig, NomadScheduler
from control.jobspec import MODEL_KEY_META
from jobs import SECOND_NS, AgentJobVariables, render_agent_job
from tests.conftest import NomadTarget
from tests.support.helpers import assert_eventually, now
from tests.support.nomad_double import NomadDouble, Policy

SECRET = "sk-test-DO-NOT-LEAK-" + "7" * 16
OTHER_KEYS = {"ANTHROPIC_API_KEY": "sk-ant-other-" + "8" * 16, "OLLAMA_API_KEY": "ollama-other-" + "9" * 16}
"""The platform's keys of providers the test jobs' models do not use: no job's Variable may hold them."""

SERVE = (
    "import http.server, os\n"
    "class H(http.server.BaseHTTPRequestHandler):\n"
    "    def do_GET(self):\n"
    "        self.send_response({code}); self.end_headers(); self.wfile.write(b'ok')\n"
    "    def log_message(self, *a): pass\n"
    "http.server.HTTPServer(('0.0.0.0', int(os.environ['CARAVAN_HEALTH_PORT'])), H).serve_forever()\n"
)
HEALTHY = SERVE.format(code=200) + "# nomad-double: healthy"
UNHEALTHY = SERVE.format(code=500) + "# nomad-double: unhealthy"
CRASH = "import sys; print('boom: bad config', file=sys.stderr); sys.exit(3)  # nomad-double: crash exit=3"


@dataclass(frozen=True)
class Ids:
    customer: str
    agent: str

    @classmethod
    def new(cls) -> Ids:
        return cls("cu-" + secrets.token_hex(6), "ag-" + secrets.token_hex(6))

    @property
    def namespace(self) -> str:
        return f"caravan-{self.customer}"

    @property
    def job_id(self) -> str:
        return f"caravan-{self.agent}"


def make_job(ids: Ids, script: str, **overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "job_id": ids.job_id,
        "namespace": ids.namespace,
        "cpu": 100,
        "memory_mb": 64,
        "driver_config": {"command": sys.executable, "args": ["-c", script]},
        "env": {"CARAVAN_AGENT_ID": ids.agent, "CARAVAN_HEALTH_PORT": "${NOMAD_PORT_health}"},
        "meta": {"caravan_owner": "caravan", "caravan_agent": ids.agent, "caravan_customer": ids.customer},
        "service_name": f"caravan-agent-{ids.agent}",
        "restart_attempts": 1,
        "restart_delay_ns": SECOND_NS // 5,
        "check_interval_ns": SECOND_NS,
        "check_timeout_ns": SECOND_NS,  # Nomad refuses a check timeout under 1 s
        "min_healthy_time_ns": SECOND_NS,
        "healthy_deadline_ns": 8 * SECOND_NS,
        "progress_deadline_ns": 20 * SECOND_NS,
    }
    values.update(overrides)
    return render_agent_job(AgentJobVariables(**values))


class Recorder:
    def __init__(self) -> None:
        self.updates: list[StatusUpdate] = []

    async def __call__(self, update: StatusUpdate) -> None:
        self.updates.append(update)

    def of(self, job_id: str) -> list[StatusUpdate]:
        return [u for u in self.updates if u.job_id == job_id]

    async def last(self, job_id: str) -> StatusUpdate | None:
        mine = self.of(job_id)
        return mine[-1] if mine else None


@dataclass
class Harness:
    target: NomadTarget
    scheduler: NomadScheduler
    recorder: Recorder
    http: httpx.AsyncClient

    async def get(self, path: str, **params: Any) -> httpx.Response:
        return await self.http.get(path, params=params)

    async def job(self, ids: Ids) -> dict[str, Any] | None:
        response = await self.get(f"/v1/job/{ids.job_id}", namespace=ids.namespace)
        return response.json() if response.status_code == 200 else None

    async def register_foreign(self, ids: Ids) -> dict[str, Any]:
        """Someone else's job under the ID Caravan would use: no caravan_owner meta."""
        job = make_job(ids, HEALTHY)
        job["Meta"] = {"team": "payments"}
        for group in job["TaskGroups"]:
            group["Meta"] = {"team": "payments"}
        admin = self.target.double
        if admin is not None:
            with admin.cond:
                admin.namespaces.setdefault(ids.namespace, {"Name": ids.namespace, "Description": "theirs"})
        else:
            await self.http.post("/v1/namespace", json={"Name": ids.namespace, "Description": "theirs"})
        response = await self.http.post(f"/v1/job/{ids.job_id}", json={"Job": job}, params={"namespace": ids.namespace})
        assert response.status_code == 200, response.text
        return job


def _headers(target: NomadTarget) -> dict[str, str]:
    return {"X-Nomad-Token": target.token} if target.token else {}


@pytest.fixture
async def harness(nomad_target: NomadTarget) -> AsyncIterator[Harness]:
    scheduler = NomadScheduler(
        NomadConfig(
            address=nomad_target.address, token=nomad_target.token, secret_env={"OPENAI_API_KEY": SECRET, **OTHER_KEYS}
        )
    )
    recorder = Recorder()
    scheduler.on_status(recorder)
    async with (
        scheduler,
        httpx.AsyncClient(base_url=nomad_target.address, headers=_headers(nomad_target), timeout=30) as http,
    ):
        yield Harness(nomad_target, scheduler, recorder, http)


def _within(harness: Harness, seconds: float) -> float:
    return seconds * 4 if harness.target.real else seconds


async def test_namespace_is_created_on_demand_with_a_description(harness: Harness) -> None:
    ids = Ids.new()
    assert (await harness.get(f"/v1/namespace/{ids.namespace}")).status_code == 404
    await harness.scheduler.submit(make_job(ids, HEALTHY))
    namespace = (await harness.get(f"/v1/namespace/{ids.namespace}")).json()
    assert namespace["Name"] == ids.namespace
    assert ids.customer in namespace["Description"]
    assert namespace["Meta"] == {"caravan_owner": "caravan", "caravan_customer": ids.customer}
    await harness.scheduler.stop_job(ids.namespace, ids.job_id)


async def test_submit_plans_registers_and_returns_nomads_handles(harness: Harness) -> None:
    ids = Ids.new()
    result = await harness.scheduler.submit(make_job(ids, HEALTHY, count=2))
    assert (result.job_id, result.namespace, result.version) == (ids.job_id, ids.namespace, 0)
    assert result.eval_id and len(result.alloc_ids) == 2
    evaluation = (await harness.get(f"/v1/evaluation/{result.eval_id}", namespace=ids.namespace)).json()
    assert evaluation["JobID"] == ids.job_id and evaluation["TriggeredBy"] == "job-register"
    await assert_eventually(
        lambda: harness.scheduler.job_status(ids.namespace, ids.job_id),
        lambda s: s is not None and list(s.allocs.values()) == [AllocState.RUNNING] * 2,
        within=_within(harness, 10),
        what="both allocations running",
    )
    states = [u.state for u in harness.recorder.of(ids.job_id)]
    assert AllocState.RUNNING in states and all(u.meta["caravan_agent"] == ids.agent for u in harness.recorder.updates)
    if harness.target.double is not None:  # the order of calls: ownership read, plan, secrets, register
        calls = [(m, p.split("?")[0]) for m, p, _ in harness.target.double.requests if ids.job_id in p]
        assert calls[:4] == [
            ("GET", f"/v1/job/{ids.job_id}"),
            ("POST", f"/v1/job/{ids.job_id}/plan"),
            ("PUT", f"/v1/var/nomad/jobs/{ids.job_id}"),
            ("POST", f"/v1/job/{ids.job_id}"),
        ]
    await harness.scheduler.stop_job(ids.namespace, ids.job_id)


async def test_a_job_without_caravans_ownership_meta_is_never_touched(harness: Harness) -> None:
    ids = Ids.new()
    theirs = await harness.register_foreign(ids)
    before = await harness.job(ids)
    assert before is not None
    with pytest.raises(JobNotOwned, match="not owned"):
        await harness.scheduler.submit(make_job(ids, HEALTHY))
    with pytest.raises(JobNotOwned):
        await harness.scheduler.stop_job(ids.namespace, ids.job_id)
    with pytest.raises(JobNotOwned):
        await harness.scheduler.plan(make_job(ids, HEALTHY))
    after = await harness.job(ids)
    assert after is not None and after["Version"] == before["Version"] and after["Meta"] == theirs["Meta"]
    assert not after["Stop"]
    response = await harness.http.delete(f"/v1/job/{ids.job_id}", params={"namespace": ids.namespace, "purge": "true"})
    assert response.status_code == 200


async def test_a_job_meant_for_another_installation_is_refused_before_any_call(harness: Harness) -> None:
    ids = Ids.new()
    job = make_job(ids, HEALTHY, meta={"caravan_owner": "someone-else", "caravan_agent": ids.agent})
    with pytest.raises(JobNotOwned):
        await harness.scheduler.submit(job)
    assert await harness.job(ids) is None


async def test_a_crash_looping_task_ends_failed_with_nomads_reason(harness: Harness) -> None:
    ids = Ids.new()
    await harness.scheduler.submit(make_job(ids, CRASH, restart_attempts=1))
    final = await assert_eventually(
        lambda: harness.recorder.last(ids.job_id),
        lambda u: u is not None and u.state is AllocState.FAILED,
        within=_within(harness, 10),
        what="the allocation failed",
    )
    assert final is not None and final.reason is not None
    assert "Exit Code: 3" in final.reason
    assert 'Exceeded allowed attempts 1 in interval 5m0s and mode is "fail"' in final.reason
    assert AllocState.RESTARTING in [u.state for u in harness.recorder.of(ids.job_id)]
    status = await harness.scheduler.job_status(ids.namespace, ids.job_id)
    assert status is not None and AllocState.FAILED in status.allocs.values()
    await harness.scheduler.stop_job(ids.namespace, ids.job_id)


@pytest.mark.parametrize(
    ("overrides", "explanation"),
    [
        ({"memory_mb": 200_000}, 'Dimension "memory" exhausted on 1 nodes'),
        ({"cpu": 60_000}, 'Dimension "cpu" exhausted on 1 nodes'),
    ],
    ids=["memory", "cpu"],
)
async def test_a_placement_failure_reports_nomads_explanation(
    harness: Harness, overrides: dict[str, Any], explanation: str
) -> None:
    ids = Ids.new()
    job = make_job(ids, HEALTHY, **overrides)
    plan = await harness.scheduler.plan(job)
    assert plan["FailedTGAllocs"]["agent"]["NodesExhausted"] >= 1
    result = await harness.scheduler.submit(job)
    assert result.alloc_ids == []
    failure = await assert_eventually(
        lambda: harness.recorder.last(ids.job_id),
        lambda u: u is not None and u.state is AllocState.FAILED,
        within=_within(harness, 5),
        what="the placement failure",
    )
    assert failure is not None and failure.reason is not None
    assert failure.reason.startswith('Nomad could not place the job: Task Group "agent" (failed to place 1 allocation)')
    assert explanation in failure.reason
    evaluation = (await harness.get(f"/v1/evaluation/{result.eval_id}", namespace=ids.namespace)).json()
    assert evaluation["BlockedEval"]  # Nomad keeps trying once capacity appears
    await harness.scheduler.stop_job(ids.namespace, ids.job_id)


async def test_a_constraint_that_fits_nowhere_is_explained(harness: Harness) -> None:
    ids = Ids.new()
    job = make_job(ids, HEALTHY)
    job["Constraints"] = [{"LTarget": "${attr.kernel.name}", "RTarget": "plan9", "Operand": "="}]
    await harness.scheduler.submit(job)
    failure = await assert_eventually(
        lambda: harness.recorder.last(ids.job_id),
        lambda u: u is not None and u.state is AllocState.FAILED,
        within=_within(harness, 5),
    )
    assert failure is not None and failure.reason is not None
    assert 'Constraint "${attr.kernel.name} = plan9": 1 nodes excluded by filter' in failure.reason
    await harness.scheduler.stop_job(ids.namespace, ids.job_id)


async def test_a_bad_version_is_rolled_back_by_nomad(harness: Harness) -> None:
    ids = Ids.new()
    await harness.scheduler.submit(make_job(ids, HEALTHY))
    await assert_eventually(
        lambda: harness.job(ids), lambda j: j is not None and j["Stable"], within=_within(harness, 10), what="stable v0"
    )
    bad = await harness.scheduler.submit(make_job(ids, UNHEALTHY))
    assert bad.version == 1
    reverted = await assert_eventually(
        lambda: harness.job(ids),
        lambda j: j is not None and j["Version"] >= 2,
        within=_within(harness, 15),
        what="Nomad's auto-revert to a new version",
    )
    assert reverted is not None
    assert reverted["TaskGroups"][0]["Tasks"][0]["Config"]["args"][-1] == HEALTHY
    deployments = (await harness.get(f"/v1/job/{ids.job_id}/deployments", namespace=ids.namespace)).json()
    failed = [d for d in deployments if d["JobVersion"] == 1]
    assert failed and failed[0]["Status"] == "failed"
    assert "rolling back to job version 0" in failed[0]["StatusDescription"]
    await harness.scheduler.stop_job(ids.namespace, ids.job_id)


async def test_replicas_are_the_group_count_and_an_update_is_a_new_version(harness: Harness) -> None:
    ids = Ids.new()
    await harness.scheduler.submit(make_job(ids, HEALTHY, count=1))
    again = await harness.scheduler.submit(make_job(ids, HEALTHY, count=1))
    assert again.version == 0  # nothing changed: no new version
    scaled = await harness.scheduler.submit(make_job(ids, HEALTHY, count=3))
    assert scaled.version == 1
    job = await harness.job(ids)
    assert job is not None and job["TaskGroups"][0]["Count"] == 3 and job["Version"] == 1
    await assert_eventually(
        lambda: harness.scheduler.job_status(ids.namespace, ids.job_id),
        lambda s: s is not None and list(s.allocs.values()).count(AllocState.RUNNING) == 3,
        within=_within(harness, 10),
    )
    await harness.scheduler.stop_job(ids.namespace, ids.job_id)


async def test_stop_deregisters_the_job_and_removes_its_secrets(harness: Harness) -> None:
    ids = Ids.new()
    await harness.scheduler.submit(make_job(ids, HEALTHY))
    variable = f"/v1/var/nomad/jobs/{ids.job_id}"
    assert (await harness.get(variable, namespace=ids.namespace)).status_code == 200
    await harness.scheduler.stop_job(ids.namespace, ids.job_id)
    job = await harness.job(ids)
    assert job is not None and job["Stop"] is True  # kept for the operator to see, as `nomad job stop` does
    assert (await harness.get(variable, namespace=ids.namespace)).status_code == 404
    assert await harness.scheduler.job_status(ids.namespace, ids.job_id) is None
    await harness.scheduler.stop_job(ids.namespace, ids.job_id)  # stopping again is fine
    await harness.scheduler.stop_job(ids.namespace, "caravan-ag-000000000000")  # so is an unknown job


async def test_a_job_started_again_after_a_stop_runs_as_the_version_nomad_holds(harness: Harness) -> None:
    """Nomad keeps a stop as a version of the job (`nomad job history` lists it, Stop set): starting the agent
    again is the version after that one, and the version Caravan reports is the one Nomad runs."""
    ids = Ids.new()
    await harness.scheduler.submit(make_job(ids, HEALTHY))
    await harness.scheduler.stop_job(ids.namespace, ids.job_id)
    history = (await harness.get(f"/v1/job/{ids.job_id}/versions", namespace=ids.namespace)).json()["Versions"]
    assert [(v["Version"], v["Stop"]) for v in history] == [(1, True), (0, False)]

    again = await harness.scheduler.submit(make_job(ids, HEALTHY))
    job = await harness.job(ids)
    assert job is not None and (job["Stop"], job["Version"], again.version) == (False, 2, 2)
    await assert_eventually(
        lambda: harness.scheduler.job_status(ids.namespace, ids.job_id),
        lambda s: s is not None and s.version == 2 and list(s.allocs.values()).count(AllocState.RUNNING) == 1,
        within=_within(harness, 10),
    )
    await harness.scheduler.stop_job(ids.namespace, ids.job_id)


async def test_secrets_reach_the_variable_and_never_the_job(harness: Harness) -> None:
    ids = Ids.new()
    meta = {"caravan_owner": "caravan", "caravan_agent": ids.agent, "caravan_customer": ids.customer}
    await harness.scheduler.submit(make_job(ids, HEALTHY, meta={**meta, MODEL_KEY_META: "OPENAI_API_KEY"}))
    variable = (await harness.get(f"/v1/var/nomad/jobs/{ids.job_id}", namespace=ids.namespace)).json()
    assert variable["Items"]["OPENAI_API_KEY"] == SECRET
    assert not set(OTHER_KEYS) & set(variable["Items"])  # only the key of the job's own model
    registered = await harness.job(ids)
    assert registered is not None and SECRET not in json.dumps(registered)
    template = registered["TaskGroups"][0]["Tasks"][0]["Templates"][0]
    assert template["Envvars"] is True and f'nomadVar "nomad/jobs/{ids.job_id}"' in template["EmbeddedTmpl"]
    if harness.target.double is not None:
        for method, path, body in harness.target.double.requests:
            if not path.startswith("/v1/var/"):
                assert SECRET.encode() not in body, (method, path)
    await harness.scheduler.stop_job(ids.namespace, ids.job_id)


async def test_a_job_whose_model_needs_no_platform_key_gets_none(harness: Harness) -> None:
    ids = Ids.new()  # e.g. replay, local, or ollama at the customer's own base_url: no caravan_model_key meta
    await harness.scheduler.submit(make_job(ids, HEALTHY))
    variable = (await harness.get(f"/v1/var/nomad/jobs/{ids.job_id}", namespace=ids.namespace)).json()
    assert not any(name.endswith("_API_KEY") for name in variable["Items"])
    await harness.scheduler.stop_job(ids.namespace, ids.job_id)


async def test_a_job_nomad_refuses_is_rejected_and_nothing_is_registered(harness: Harness) -> None:
    ids = Ids.new()
    await harness.scheduler.submit(make_job(ids, HEALTHY))  # the namespace exists
    other = Ids(ids.customer, "ag-" + secrets.token_hex(6))
    wrong_type = make_job(other, HEALTHY)
    wrong_type["TaskGroups"][0]["Count"] = "two"
    with pytest.raises(JobRejected, match="unmarshal"):
        await harness.scheduler.submit(wrong_type)
    invalid = make_job(other, HEALTHY)
    invalid["TaskGroups"][0]["Tasks"][0]["Driver"] = ""
    with pytest.raises(JobRejected, match="driver"):
        await harness.scheduler.submit(invalid)
    # what the job variables refuse before rendering (tests/jobs), as Nomad would
    short_check = make_job(other, HEALTHY)
    short_check["TaskGroups"][0]["Services"][0]["Checks"][0]["Timeout"] = SECOND_NS // 2
    with pytest.raises(JobRejected, match="lower than required minimum timeout 1s"):
        await harness.scheduler.submit(short_check)
    crowded = make_job(other, HEALTHY)
    crowded["TaskGroups"][0]["RestartPolicy"].update(Attempts=100, Delay=5 * SECOND_NS)
    with pytest.raises(JobRejected, match="can't restart the TaskGroup 100 times in an interval of 5m0s"):
        await harness.scheduler.submit(crowded)
    assert await harness.job(other) is None
    await harness.scheduler.stop_job(ids.namespace, ids.job_id)


async def test_allocation_statistics_come_from_the_client_api(harness: Harness) -> None:
    ids = Ids.new()
    await harness.scheduler.submit(make_job(ids, HEALTHY))
    stats = await assert_eventually(
        lambda: harness.scheduler.alloc_stats(ids.namespace, ids.job_id),
        lambda s: len(s) == 1,
        within=_within(harness, 10),
    )
    assert set(stats[0]) == {"alloc_id", "cpu_percent", "memory_rss_mb"}
    assert stats[0]["memory_rss_mb"] > 0
    assert await harness.scheduler.alloc_stats(ids.namespace, "caravan-ag-000000000000") == []
    await harness.scheduler.stop_job(ids.namespace, ids.job_id)


async def test_the_event_stream_frames_events_as_ndjson(harness: Harness) -> None:
    ids = Ids.new()
    # submitted first, then read from the start of Nomad's event buffer (index 0): Nomad writes a stream's headers
    # with its first frame, so a client that waits for them before the event happens waits for a heartbeat (30 s)
    await harness.scheduler.submit(make_job(ids, HEALTHY))
    params = {"namespace": ids.namespace, "topic": f"Job:{ids.job_id}", "index": 0}
    async with harness.http.stream("GET", "/v1/event/stream", params=params, timeout=30) as stream:
        assert stream.status_code == 200
        async for line in stream.aiter_lines():
            frame = json.loads(line) if line.strip() else {}
            if frame.get("Events"):
                break
    (event,) = [e for e in frame["Events"] if e["Type"] == "JobRegistered"]
    assert (event["Topic"], event["Key"], event["Namespace"]) == ("Job", ids.job_id, ids.namespace)
    assert event["Index"] == frame["Index"] and event["Payload"]["Job"]["Meta"]["caravan_agent"] == ids.agent
    await harness.scheduler.stop_job(ids.namespace, ids.job_id)


async def test_an_event_stream_asked_for_an_index_ahead_of_nomads_skips_nothing(harness: Harness) -> None:
    """Nomad starts an event stream at the buffered event of the index asked for, or at the newest it holds when
    that index is ahead of them all (``StartAtClosest`` in ``nomad/stream/event_buffer.go``: a cluster rebuilt since
    the client last read, whose index is lower), and sends every event after it: none is skipped for an index
    lower than the one asked for."""
    ids = Ids.new()
    await harness.scheduler.submit(make_job(ids, HEALTHY))
    ahead = 10**12
    topics = [f"Job:{ids.job_id}", "Allocation:*", "Deployment:*"]
    params: dict[str, Any] = {"namespace": ids.namespace, "topic": topics, "index": ahead}

    async def first_frame() -> dict[str, Any]:
        async with harness.http.stream("GET", "/v1/event/stream", params=params, timeout=60) as stream:
            assert stream.status_code == 200
            async for line in stream.aiter_lines():
                frame: dict[str, Any] = json.loads(line) if line.strip() else {}
                if frame.get("Events"):
                    return frame
        raise AssertionError("the stream ended")

    reader = asyncio.create_task(first_frame())
    done, _ = await asyncio.wait({reader}, timeout=2)
    if not done:  # the newest event Nomad holds is not one of the job's: the next are (Nomad sends the stream's
        await harness.scheduler.stop_job(ids.namespace, ids.job_id)  # headers with its first frame)
    frame = await asyncio.wait_for(reader, timeout=_within(harness, 10))
    assert frame["Index"] < ahead
    assert {e["Namespace"] for e in frame["Events"]} == {ids.namespace}
    await harness.scheduler.stop_job(ids.namespace, ids.job_id)


async def test_an_evaluation_can_be_followed_with_a_blocking_query(harness: Harness) -> None:
    """As the scheduler follows a job's evaluation (``_wait_eval``): a query at the evaluation's index is answered
    once the evaluation itself changes (Nomad answers with its ``ModifyIndex``: a change elsewhere does not count)."""
    ids = Ids.new()
    await harness.scheduler.submit(make_job(ids, HEALTHY))  # the namespace exists
    other = Ids(ids.customer, "ag-" + secrets.token_hex(6))
    registered = await harness.http.post(
        f"/v1/job/{other.job_id}", json={"Job": make_job(other, HEALTHY)}, params={"namespace": other.namespace}
    )
    assert registered.status_code == 200, registered.text
    eval_id, created = registered.json()["EvalID"], int(registered.json()["EvalCreateIndex"])
    path = f"/v1/evaluation/{eval_id}"
    answer = await harness.get(path, namespace=other.namespace, index=created, wait="20s")
    evaluation = answer.json()
    assert answer.status_code == 200 and evaluation["Status"] != "pending", evaluation  # held until processed
    assert int(answer.headers["X-Nomad-Index"]) == evaluation["ModifyIndex"] > created
    # nothing changes it any more: a query at its index is held to the end of its wait, whatever else happens
    if harness.target.double is not None:
        index = evaluation["ModifyIndex"]
        held = asyncio.create_task(harness.get(path, namespace=other.namespace, index=index, wait="1s"))
        await asyncio.to_thread(harness.target.double.wait_held)
        await harness.scheduler.stop_job(ids.namespace, ids.job_id)  # the latest index moves on
        assert int((await held).headers["X-Nomad-Index"]) == index
    for job in (ids, other):
        await harness.scheduler.stop_job(job.namespace, job.job_id)


async def test_a_token_without_submit_job_gets_nomads_permission_denied() -> None:
    reader = Policy(namespaces={"caravan-*": {"read-job", "list-jobs"}}, variables={"nomad/jobs/*": {"write"}})
    writer = Policy(namespaces={"caravan-*": {"read-job", "submit-job"}}, variables={"nomad/jobs/*": {"write"}})
    ids = Ids.new()
    with NomadDouble(tokens={"reader": reader, "writer": writer, "root": Policy(management=True)}) as double:
        with double.cond:
            double.namespaces[ids.namespace] = {"Name": ids.namespace, "Description": "pre-made"}
        async with NomadScheduler(NomadConfig(address=double.address, token="reader")) as scheduler:
            with pytest.raises(SchedulerError, match="Permission denied"):
                await scheduler.submit(make_job(ids, HEALTHY))
        other = Ids.new()
        async with NomadScheduler(NomadConfig(address=double.address, token="writer")) as scheduler:
            with pytest.raises(SchedulerError, match="management token"):
                await scheduler.submit(make_job(other, HEALTHY))  # namespaces need CARAVAN_NOMAD_NAMESPACE_TOKEN
        config = NomadConfig(address=double.address, token="writer", namespace_token="root")
        async with NomadScheduler(config) as scheduler:
            assert (await scheduler.submit(make_job(other, HEALTHY))).eval_id
        assert all(j["ID"] != ids.job_id for j in double.jobs.values())


async def test_what_the_event_stream_tracks_stays_bounded_on_a_busy_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    """A control plane runs for months while the cluster's event stream names ever new jobs and allocations: it
    keeps a bounded number of each, and still reports every change of the allocations it follows, once."""
    monkeypatch.setattr(nomad_backend, "FOREIGN_KEPT", 10)
    monkeypatch.setattr(nomad_backend, "ALLOCS_KEPT", 10)
    scheduler = NomadScheduler(NomadConfig(address="http://127.0.0.1:9"))  # never started: no call to Nomad
    recorder = Recorder()
    scheduler.on_status(recorder)
    ours = {
        "Namespace": "caravan-cu-000000000001",
        "ID": "caravan-ag-000000000001",
        "Meta": {"caravan_owner": "caravan"},
    }
    await scheduler._on_event({"Topic": "Job", "Type": "JobRegistered", "Payload": {"Job": ours}})
    for i in range(100):
        theirs = {"Namespace": "default", "ID": f"batch-{i}", "Meta": {}}
        await scheduler._on_event({"Topic": "Job", "Type": "JobRegistered", "Payload": {"Job": theirs}})

    async def alloc(i: int, status: str) -> None:
        payload = {"ID": f"alloc-{i}", "Namespace": ours["Namespace"], "JobID": ours["ID"], "ClientStatus": status}
        await scheduler._on_event({"Topic": "Allocation", "Payload": {"Allocation": payload}})

    for i in range(100):
        await alloc(i, "running")
    await alloc(99, "running")  # the same state again: not reported twice
    await alloc(99, "complete")
    assert len(scheduler._foreign) == 10 and len(scheduler._allocs) == 10
    mine = [(u.alloc_id, u.state) for u in recorder.updates]
    assert mine == [*((f"alloc-{i}", AllocState.RUNNING) for i in range(100)), ("alloc-99", AllocState.STOPPED)]


@pytest.mark.parametrize("route", ["eval_get", "eval_allocs"])
async def test_a_job_registered_while_nomad_cannot_answer_for_its_evaluation_is_submitted(route: str) -> None:
    """Nomad registered the job, then failed to answer for its evaluation or what it placed (500 No cluster leader,
    as while it elects a leader): the job runs, so the submit succeeds with the evaluation's ID, and the event
    stream reports the job. Against the double only: a real Nomad cannot be made to fail these reads on demand."""
    ids = Ids.new()
    recorder = Recorder()
    with NomadDouble() as double:
        async with NomadScheduler(NomadConfig(address=double.address)) as scheduler:
            scheduler.on_status(recorder)
            with double.failing(route):
                result = await scheduler.submit(make_job(ids, HEALTHY))
            assert (result.job_id, result.version, result.alloc_ids) == (ids.job_id, 0, [])
            assert result.eval_id is not None and result.eval_id in double.evals
            await assert_eventually(
                lambda: recorder.last(ids.job_id),
                lambda u: u is not None and u.state is AllocState.RUNNING,
                what="the allocation running, from the event stream",
            )
            await scheduler.stop_job(ids.namespace, ids.job_id)


async def test_calls_nomad_fails_while_it_elects_a_leader_are_made_again() -> None:
    """Nomad answers 500 "No cluster leader" for a moment while its servers elect one (and a proxy in front of it
    502-504): the submit waits it out, and its job is registered once, placed and reported as Nomad placed it. A
    refusal that will not pass (a job Nomad finds invalid) is not asked again. Against the double only: a real
    Nomad cannot be made to fail on demand."""
    ids = Ids.new()
    with NomadDouble() as double:
        async with NomadScheduler(NomadConfig(address=double.address)) as scheduler:

            def calls(method: str, path: str) -> int:
                return len([r for r in double.requests if r[0] == method and r[1].split("?")[0] == path])

            with double.failing("job_register", "eval_get", times=1), double.failing("var_put", code=503, times=2):
                result = await scheduler.submit(make_job(ids, HEALTHY))
            assert (result.job_id, result.version) == (ids.job_id, 0)
            assert len(result.alloc_ids) == 1, "the placement was read once Nomad answered"
            assert calls("POST", f"/v1/job/{ids.job_id}") == 2  # the refused one, then the one Nomad took
            assert calls("PUT", f"/v1/var/nomad/jobs/{ids.job_id}") == 3
            assert [v["Version"] for v in double.versions[(ids.namespace, ids.job_id)]] == [0]

            other = Ids.new()
            invalid = "1 error occurred:\n\t* Task group agent validation failed: bad\n\n"
            with double.failing("job_register", message=invalid, times=1), pytest.raises(JobRejected, match="bad"):
                await scheduler.submit(make_job(other, HEALTHY))
            assert calls("POST", f"/v1/job/{other.job_id}") == 1
            await scheduler.stop_job(ids.namespace, ids.job_id)


async def test_a_namespace_an_operator_deleted_is_created_again_by_the_next_submit_or_plan(harness: Harness) -> None:
    """Caravan remembers which customers' namespaces exist and does not ask again. An operator deletes one (``nomad
    namespace delete``, which Nomad allows once the namespace holds no live job, allocation or Variable: the
    customer's agents are stopped); Nomad then refuses a job in it as in a nonexistent namespace. The next submit,
    and the next plan, create the namespace again and go on, instead of failing until the control plane restarts."""
    ids = Ids.new()
    job = make_job(ids, HEALTHY)
    path = f"/v1/namespace/{ids.namespace}"

    async def stop_and_delete_the_namespace() -> None:
        await harness.scheduler.stop_job(ids.namespace, ids.job_id)
        deleted = await assert_eventually(
            lambda: harness.http.delete(path),
            lambda r: r.status_code == 200,
            within=_within(harness, 10),
            what="the namespace deleted (Nomad refuses while the stopped job's allocation is not yet terminal)",
        )
        assert deleted.status_code == 200, deleted.text
        assert (await harness.get(path)).status_code == 404

    await harness.scheduler.submit(job)
    await stop_and_delete_the_namespace()
    result = await harness.scheduler.submit(job)
    assert result.eval_id
    namespace = (await harness.get(path)).json()
    assert namespace["Meta"] == {"caravan_owner": "caravan", "caravan_customer": ids.customer}
    await assert_eventually(
        lambda: harness.scheduler.job_status(ids.namespace, ids.job_id),
        lambda s: s is not None and AllocState.RUNNING in s.allocs.values(),
        within=_within(harness, 10),
        what="the job running again",
    )
    await stop_and_delete_the_namespace()
    plan = await harness.scheduler.plan(job)
    assert plan["Diff"]["ID"] == ids.job_id
    assert (await harness.get(path)).status_code == 200


async def test_a_job_refused_for_its_namespace_once_more_after_creating_it_is_rejected() -> None:
    """The namespace is created again once per submit: if Nomad still refuses the job as in a nonexistent namespace
    (deleted again meanwhile), the submit fails as any job Nomad refuses does, and is not tried again. Against the
    double only: a real Nomad cannot be made to refuse a plan on demand."""
    ids = Ids.new()
    gone = f'1 error occurred:\n\t* job "{ids.job_id}" is in nonexistent namespace "{ids.namespace}"\n\n'
    with NomadDouble() as double:
        async with NomadScheduler(NomadConfig(address=double.address)) as scheduler:
            with double.failing("job_plan", message=gone), pytest.raises(JobRejected, match="nonexistent namespace"):
                await scheduler.submit(make_job(ids, HEALTHY))
    calls = [(m, p.split("?")[0]) for m, p, _ in double.requests if ids.namespace in p or ids.job_id in p]
    namespace, plan = f"/v1/namespace/{ids.namespace}", f"/v1/job/{ids.job_id}/plan"
    assert [c for c in calls if c[1] in (namespace, plan)] == [
        ("GET", namespace),  # 404: created
        ("POST", namespace),
        ("POST", plan),  # refused: the namespace is forgotten and looked up again
        ("GET", namespace),
        ("POST", plan),  # refused again: rejected
    ]
    assert not double.jobs


async def test_a_job_stopped_by_another_replica_gets_its_secrets_again_when_started(harness: Harness) -> None:
    """Two control-plane replicas: one starts the agent, the other stops it (removing the job's Variable), the
    first starts it again. The Variable must be written again, or the task's template waits for it forever."""
    ids = Ids.new()
    meta = {"caravan_owner": "caravan", "caravan_agent": ids.agent, "caravan_customer": ids.customer}
    job = make_job(ids, HEALTHY, meta={**meta, MODEL_KEY_META: "OPENAI_API_KEY"})
    variable = f"/v1/var/nomad/jobs/{ids.job_id}"
    other = NomadScheduler(NomadConfig(address=harness.target.address, token=harness.target.token))
    async with other:
        await harness.scheduler.submit(job)
        await other.stop_job(ids.namespace, ids.job_id)
        assert (await harness.get(variable, namespace=ids.namespace)).status_code == 404
        await harness.scheduler.submit(job)
    answer = await harness.get(variable, namespace=ids.namespace)
    assert answer.status_code == 200, answer.text
    assert answer.json()["Items"]["OPENAI_API_KEY"] == SECRET
    await harness.scheduler.stop_job(ids.namespace, ids.job_id)


async def test_after_nomads_index_went_back_what_changed_while_the_stream_was_lost_still_reaches_the_status() -> None:
    """The cluster behind Nomad's address is rebuilt (or restored from a snapshot into fresh servers): it counts
    from an index lower than the one the scheduler last saw. The scheduler follows the new cluster's index, so that
    when the stream is lost again, what changed meanwhile is replayed from where it stood: here an agent another
    control-plane replica started (its job is not among those the scheduler reads again after a reconnect), whose
    allocation runs. From the index seen before the rebuild, Nomad would start the stream at its newest event only.
    Against the double only: a real Nomad cannot be rebuilt on demand."""
    recorder = Recorder()

    def running(update: StatusUpdate | None) -> bool:
        return update is not None and update.state is AllocState.RUNNING

    with NomadDouble() as double:
        config = NomadConfig(address=double.address)
        async with NomadScheduler(config) as follower, NomadScheduler(config) as other:
            follower.on_status(recorder)
            await assert_eventually(now(follower.event_feed), lambda f: f.connected, what="connected")
            with double.cond:
                double.index = 100_000  # a cluster that has run for a while
            first = Ids.new()
            await other.submit(make_job(first, HEALTHY))
            await assert_eventually(lambda: recorder.last(first.job_id), running, what="the first agent running")
            before = follower.event_feed().since
            double.rebuild(index=1_000)
            await assert_eventually(
                now(follower.event_feed), lambda f: f.connected and f.since > before, what="the new cluster's stream"
            )
            second = Ids(first.customer, "ag-" + secrets.token_hex(6))
            await other.submit(make_job(second, HEALTHY))
            await assert_eventually(lambda: recorder.last(second.job_id), running, what="the second agent running")

            def deployed(ids: Ids) -> bool:
                with double.cond:
                    return any(
                        d["JobID"] == ids.job_id and d["Status"] == "successful" for d in double.deployments.values()
                    )

            with double.failing("events", code=502, message="Bad Gateway"):
                await assert_eventually(now(follower.event_feed), lambda f: not f.connected, what="the stream lost")
                third = Ids(first.customer, "ag-" + secrets.token_hex(6))
                await other.submit(make_job(third, HEALTHY))
                await assert_eventually(now(lambda: deployed(third)), bool, what="the third agent deployed")
                await other.stop_job(first.namespace, first.job_id)  # Nomad's newest events are another job's
            await assert_eventually(
                lambda: recorder.last(third.job_id), running, what="the third agent running, from the replay"
            )
            for ids in (second, third):
                await other.stop_job(ids.namespace, ids.job_id)


async def test_the_event_feed_is_connected_while_the_scheduler_follows_the_stream(harness: Harness) -> None:
    feed = await assert_eventually(
        now(harness.scheduler.event_feed), lambda f: f.connected, within=_within(harness, 20), what="connected"
    )
    assert (feed.last_error, feed.failures) == (None, 0) and feed.since <= datetime.now(UTC)


@pytest.mark.parametrize(
    ("code", "message", "kind", "level_of_first"),
    [
        (403, "Permission denied", "unauthorized (403)", logging.ERROR),
        (401, "Unauthorized", "unauthorized (401)", logging.ERROR),
        (502, "Bad Gateway", "HTTP 502", logging.INFO),
    ],
    ids=["refused", "unauthenticated", "proxy"],
)
async def test_a_lost_event_stream_is_reported_logged_at_error_once_and_caught_up_when_back(
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    code: int,
    message: str,
    kind: str,
    level_of_first: int,
) -> None:
    """Nomad closes the stream and refuses it again (a token whose policy lost read-job: 403, which trying again
    will not pass, logged at ERROR at once, as a 401 from a proxy that authenticates; a proxy answering 502: at
    ERROR once it has lasted): the feed says since
    when and why, the log says it at ERROR once however many attempts fail, and INFO when it is back; what changed
    meanwhile is reported then. Against the double only: a real Nomad cannot be made to refuse the stream on
    demand."""
    monkeypatch.setattr(nomad_backend, "RECONNECT_FIRST_S", 0.1)
    monkeypatch.setattr(nomad_backend, "LOST_ERROR_AFTER_S", 0.3)
    monkeypatch.setattr(nomad_backend, "STEADY_STREAM_S", 0.3)
    caplog.set_level(logging.DEBUG, logger="caravan.scheduler.nomad")
    token = "a1b2c3d4-token-" + secrets.token_hex(8)
    ids = Ids.new()
    recorder = Recorder()
    with NomadDouble(heartbeat_s=0.1) as double:
        async with NomadScheduler(NomadConfig(address=double.address, token=token)) as scheduler:
            scheduler.on_status(recorder)
            await assert_eventually(now(scheduler.event_feed), lambda f: f.connected, what="connected")
            with double.failing("events", code=code, message=message):
                lost = await assert_eventually(
                    now(scheduler.event_feed), lambda f: f.failures >= 4, what="four failed attempts"
                )
                assert not lost.connected and lost.last_error == f"{code} {message}"
                assert lost.last_error_kind == kind  # what an unauthenticated probe may show of it
                await scheduler.submit(make_job(ids, HEALTHY))  # the API serves meanwhile
                assert await recorder.last(ids.job_id) is None  # its allocation runs, and nothing says so yet
            back = await assert_eventually(now(scheduler.event_feed), lambda f: f.connected, what="connected again")
            assert (back.last_error, back.last_error_kind, back.failures) == (None, None, 0)
            assert back.since > lost.since
            await assert_eventually(
                lambda: recorder.last(ids.job_id),
                lambda u: u is not None and u.state is AllocState.RUNNING,
                what="the allocation's state caught up",
            )
            await scheduler.stop_job(ids.namespace, ids.job_id)
            await assert_eventually(now(lambda: caplog.text), lambda text: "connected again" in text, what="steady")
    mine = [r for r in caplog.records if r.name == "caravan.scheduler.nomad" and "event stream" in r.getMessage()]
    errors = [r.getMessage() for r in mine if r.levelno == logging.ERROR]
    assert len(errors) == 1 and f"{code} {message}" in errors[0], errors
    assert ('read-job in a rule for namespace "*"' in errors[0]) is (code in (401, 403))
    first = next(r for r in mine if f"{code} {message}" in r.getMessage())
    assert first.levelno == level_of_first
    assert [r.levelno for r in mine if "connected again" in r.getMessage()] == [logging.INFO]
    assert token not in caplog.text and token not in repr(lost)


async def test_a_stream_a_proxy_ends_at_once_does_not_end_the_loss(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A proxy in front of Nomad ends every event stream right after its headers (a response timeout too short
    for a stream). Each such connection is one more failed attempt of the loss, not its end: the failures add up
    in the feed (what `/readyz` shows) from the same `since`, the back-off grows rather than starting over at each
    connection (which lists every job again), and the log says ERROR once. When streams stay open again, the feed
    is back, and the log says so once, as the stream is steady. Against the double only."""
    monkeypatch.setattr(nomad_backend, "RECONNECT_FIRST_S", 0.1)
    monkeypatch.setattr(nomad_backend, "LOST_ERROR_AFTER_S", 0.3)
    monkeypatch.setattr(nomad_backend, "STEADY_STREAM_S", 0.3)
    caplog.set_level(logging.DEBUG, logger="caravan.scheduler.nomad")
    with NomadDouble(heartbeat_s=0.1) as double:
        async with NomadScheduler(NomadConfig(address=double.address)) as scheduler:
            await assert_eventually(now(scheduler.event_feed), lambda f: f.connected, what="connected")
            double.cut_streams = True
            first = await assert_eventually(now(scheduler.event_feed), lambda f: f.failures >= 1, what="lost")
            lost = await assert_eventually(
                now(scheduler.event_feed), lambda f: f.failures >= 4, what="four failed attempts"
            )
            assert not lost.connected and lost.since == first.since
            assert (lost.last_error, lost.last_error_kind) == (nomad_backend.STREAM_ENDED, "stream ended")
            double.cut_streams = False
            await assert_eventually(
                now(lambda: caplog.text), lambda text: "connected again" in text, what="steady again"
            )
            back = scheduler.event_feed()
            assert back.connected and (back.last_error, back.failures) == (None, 0)
    mine = [r for r in caplog.records if r.name == "caravan.scheduler.nomad" and "event stream" in r.getMessage()]
    errors = [r.getMessage() for r in mine if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "lost for" in errors[0], errors
    again = [r.getMessage() for r in mine if "connected again" in r.getMessage()]
    assert len(again) == 1, again
    waits = [float(m[1]) for r in mine if (m := re.search(r"reconnecting in ([\d.]+)s", r.getMessage()))]
    assert waits[:2] == [0.1, 0.2] and waits == sorted(set(waits)), waits  # (the ERROR's attempt says no wait)


async def test_a_stream_that_breaks_off_mid_frame_is_a_lost_connection_and_the_feed_comes_back(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection under an open event stream breaks in the middle of a frame (a network that drops it, a
    Nomad server killed as it writes): the feed says `connection lost` (the fixed words `/readyz` shows anyone),
    the log gives the reason, the failures add up while every new stream breaks too, and once streams hold again
    the feed is back with what changed meanwhile. Against the double only."""
    monkeypatch.setattr(nomad_backend, "RECONNECT_FIRST_S", 0.1)
    monkeypatch.setattr(nomad_backend, "STEADY_STREAM_S", 0.3)
    caplog.set_level(logging.DEBUG, logger="caravan.scheduler.nomad")
    ids = Ids.new()
    recorder = Recorder()
    with NomadDouble(heartbeat_s=0.1) as double:
        async with NomadScheduler(NomadConfig(address=double.address)) as scheduler:
            scheduler.on_status(recorder)
            await assert_eventually(now(scheduler.event_feed), lambda f: f.connected, what="connected")
            double.break_streams = True
            lost = await assert_eventually(
                now(scheduler.event_feed), lambda f: f.failures >= 3, what="three broken streams"
            )
            assert not lost.connected and lost.last_error_kind == "connection lost", lost
            await scheduler.submit(make_job(ids, HEALTHY))
            double.break_streams = False
            await assert_eventually(
                lambda: recorder.last(ids.job_id),
                lambda u: u is not None and u.state is AllocState.RUNNING,
                what="the allocation's state, once the stream holds",
            )
            back = await assert_eventually(
                now(scheduler.event_feed), lambda f: f.connected and not f.failures, what="back"
            )
            assert back.last_error_kind is None
    lost_lines = [r.getMessage() for r in caplog.records if "event stream lost" in r.getMessage()]
    assert lost_lines and "Connection broken" in lost_lines[0], lost_lines  # the reason, for the operator


async def test_the_kind_of_a_lost_event_streams_failure_is_told_in_fixed_words_naming_no_address() -> None:
    """Nomad goes away: its stream ends, then nothing answers. The feed's kind of failure (what ``/readyz`` shows
    anyone) says ``unreachable``; its error (for the log) gives the network's reason. Against the double only."""
    with NomadDouble() as double:
        scheduler = NomadScheduler(NomadConfig(address=double.address))
        await scheduler.start()
        await assert_eventually(now(scheduler.event_feed), lambda f: f.connected, what="connected")
    try:
        gone = await assert_eventually(
            now(scheduler.event_feed), lambda f: f.last_error_kind == "unreachable", what="Nomad unreachable"
        )
        assert not gone.connected and gone.failures >= 2  # the stream's end, then no answer
        assert gone.last_error is not None and "refused" in gone.last_error.lower()
    finally:
        await scheduler.stop()


async def test_nomad_answers_reads_of_a_job_it_does_not_hold_with_none(harness: Harness) -> None:
    """What the scheduler reads of an agent's job that Nomad does not hold (never registered, or purged) is answered
    as Nomad answers it: its allocations and deployments 200 with none, not 404 (``Job.Allocations`` and
    ``Job.Deployments``, nomad/job_endpoint.go, look no job up), the job itself 404; a Variable that is not there is
    deleted without a word, 204 as one that is (``variableDelete``, command/agent/variable_endpoint.go)."""
    ids = Ids.new()
    await harness.scheduler.submit(make_job(ids, HEALTHY))
    gone = "caravan-ag-000000000000"
    allocations = await harness.get(f"/v1/job/{gone}/allocations", namespace=ids.namespace)
    deployments = await harness.get(f"/v1/job/{gone}/deployments", namespace=ids.namespace)
    for listed in (allocations, deployments):
        assert listed.status_code == 200, listed.text
        assert listed.json() == []
    assert (await harness.get(f"/v1/job/{gone}", namespace=ids.namespace)).status_code == 404
    for path in (f"nomad/jobs/{gone}", f"nomad/jobs/{ids.job_id}"):
        deleted = await harness.http.delete(f"/v1/var/{path}", params={"namespace": ids.namespace})
        assert (deleted.status_code, deleted.content) == (204, b"")
    assert await harness.scheduler.alloc_stats(ids.namespace, gone) == []
    await harness.scheduler.stop_job(ids.namespace, ids.job_id)
