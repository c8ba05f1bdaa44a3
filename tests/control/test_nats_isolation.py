"""NATS permissions, enforced by the server: an agent's credentials reach only its own customer's subjects and
its own task queue; the platform's own user cannot delete the audit log, nor limit it; the operators' watching user
only listens; nobody gets in without a user. Each test that takes ``secured`` runs twice: on the embedded default
(users listed in auth.conf) and on a NATS of the operator's own configured as nomad/nats.nomad.hcl configures it,
whose users the control plane gives by the auth callout."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from pathlib import Path

import nats
import pytest
from nats.js.api import ConsumerConfig

from agent.backends.natskv import NatsKVFlags
from control.natsserver import EmbeddedNats
from control.platform import ControlPlane
from control.services.audit import AUDIT_STREAM
from tests.conftest import make_settings, serve_api
from tests.gateway.teams_support import agent_ready
from tests.gateway.test_tasks_api import finished, running_agent, start_task
from tests.support.helpers import stalled
from tests.support.nats_users import Secured, Violations, connect_as


async def test_agents_work_end_to_end_with_their_own_restricted_credentials(secured: Secured) -> None:
    api = secured.api
    _, headers = await api.new_customer()
    agent = await running_agent(api, headers)
    task = await finished(api, headers, await start_task(api, headers, agent["id"]))
    assert task["status"] == "completed" and task["result"] == "The result is 20."
    killed = await api.client.post(
        "/v1/admin/killswitch",
        json={"scope": "agent", "agent_id": agent["id"], "reason": "t"},
        headers=await api.admin(),
    )
    assert killed.json()["acknowledged"] == 1  # flag watches are allowed too


async def test_one_customers_agent_cannot_reach_another_customers_subjects(secured: Secured) -> None:
    api = secured.api
    a_customer, a_headers = await api.new_customer("a")
    b_customer, b_headers = await api.new_customer("b")
    a_agent = await running_agent(api, a_headers)
    b_agent = await running_agent(api, b_headers)
    violations = Violations()
    nc = await connect_as(secured, a_agent["id"], violations)
    try:
        # its own definition: allowed
        own = await nc.request(f"caravan.ctl.{a_customer}.definition.{a_agent['id']}", b"{}", timeout=5)
        assert b"calc" in own.data
        # publish on B's subjects
        await nc.publish(f"caravan.events.{b_customer}.task.tk-000000000000", b"{}")
        await nc.flush()
        await violations.seen(f'Permissions Violation for Publish to "caravan.events.{b_customer}')
        # subscribe to B's events
        await nc.subscribe(f"caravan.events.{b_customer}.>")
        await nc.flush()
        await violations.seen(f'Permissions Violation for Subscription to "caravan.events.{b_customer}')
        # request B's agent definition, and pull from B's task queue
        with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
            await nc.request(f"caravan.ctl.{b_customer}.definition.{b_agent['id']}", b"{}", timeout=1)
        await violations.seen(f"caravan.ctl.{b_customer}.definition")
        await nc.publish(f"$JS.API.CONSUMER.MSG.NEXT.CARAVAN_TASKS.agent-{b_agent['id']}", b"1")
        await nc.flush()
        await violations.seen(f"agent-{b_agent['id']}")
        # another agent's inbox
        await nc.subscribe(f"_INBOX_{b_agent['id']}.>")
        await nc.flush()
        await violations.seen(f"_INBOX_{b_agent['id']}")
        # the killswitch flags that cover it can be read (its watch starts from them); B's flag cannot
        store = NatsKVFlags(nc)
        await store.start()  # as the agent binds it
        flags = store.kv
        with pytest.raises(nats.js.errors.KeyNotFoundError):
            await flags.get(f"killswitch.agent.{a_agent['id']}")  # allowed: none is engaged
        with pytest.raises(nats.errors.TimeoutError):  # refused: no answer (a KeyNotFoundError would be a read)
            await flags.get(f"killswitch.customer.{b_customer}")
        await violations.seen(f"killswitch.customer.{b_customer}")
    finally:
        await nc.close()


async def test_an_agent_learns_nothing_of_other_flags_and_makes_no_consumer_of_them(secured: Secured) -> None:
    """The flags bucket holds every customer's: its stream's info lists their keys, and a consumer reads their
    values (the reason, the admin), its delivery subject named by whoever makes it, any customer's. An agent
    watches its three flags by their subjects instead."""
    api = secured.api
    _, a_headers = await api.new_customer("a")
    b_customer, _ = await api.new_customer("b")
    a_agent = await running_agent(api, a_headers)
    engaged = await api.client.post(
        "/v1/admin/killswitch",
        json={"scope": "customer", "customer_id": b_customer, "reason": "unpaid"},
        headers=await api.admin(),
    )
    assert engaged.status_code == 200, engaged.text
    violations = Violations()
    nc = await connect_as(secured, a_agent["id"], violations)
    js = nc.jetstream(timeout=1)
    try:
        with pytest.raises(nats.errors.TimeoutError):
            await js.stream_info("KV_caravan_flags", subjects_filter=">")
        await violations.seen('Permissions Violation for Publish to "$JS.API.STREAM.INFO.KV_caravan_flags"')
        inbox = f"_INBOX_{a_agent['id']}.flags"
        read = await nc.subscribe(inbox)
        for deliver in (inbox, f"caravan.ctl.{b_customer}.cancel.ag-0123456789ab"):
            config = ConsumerConfig(deliver_subject=deliver, filter_subject="$KV.caravan_flags.>", idle_heartbeat=1)
            with pytest.raises(nats.errors.TimeoutError):
                await js.add_consumer("KV_caravan_flags", config)
        await violations.seen('Permissions Violation for Publish to "$JS.API.CONSUMER.CREATE.KV_caravan_flags"')
        with pytest.raises(nats.errors.TimeoutError):
            await read.next_msg(timeout=0.5)
        await nc.subscribe("$KV.caravan_flags.>")
        await nc.flush()
        await violations.seen('Permissions Violation for Subscription to "$KV.caravan_flags.>"')
    finally:
        await nc.close()


async def test_an_agent_cannot_publish_elsewhere_by_answering_a_message_it_sent_itself(secured: Secured) -> None:
    """An answer goes where the message answered names: with NATS's allow_responses, an agent that sent itself a
    message naming another customer's subject (or JetStream's API) could then publish there, anything."""
    api = secured.api
    a_customer, a_headers = await api.new_customer("a")
    b_customer, _ = await api.new_customer("b")
    a_agent = await running_agent(api, a_headers)
    control = secured.auth.control()
    platform = await nats.connect(secured.url, user=control.user, password=control.password)
    violations = Violations()
    nc = await connect_as(secured, a_agent["id"], violations)
    try:
        keys = (await platform.jetstream().stream_info("KV_caravan_keys")).state.messages
        forged = f"caravan.events.{b_customer}.task.tk-0123456789ab"
        heard = await platform.subscribe(forged)
        await platform.flush()
        mirror = await nc.subscribe(f"caravan.rt.{a_customer}.mirror")
        for target in (forged, "$JS.API.STREAM.PURGE.KV_caravan_keys"):
            await nc.publish(f"caravan.rt.{a_customer}.mirror", b"", reply=target)
            received = await mirror.next_msg(timeout=5)
            assert received.reply == target
            await received.respond(b'{"kind": "result", "content": "forged"}')
            await nc.flush()
            await violations.seen(f'Permissions Violation for Publish to "{target}"')
        await platform.flush()
        with pytest.raises(nats.errors.TimeoutError):
            await heard.next_msg(timeout=0.5)
        assert (await platform.jetstream().stream_info("KV_caravan_keys")).state.messages == keys  # every key kept
    finally:
        await nc.close()
        await platform.close()


async def test_an_event_naming_another_customer_than_its_subject_changes_nothing(secured: Secured) -> None:
    """An agent publishes on its own customer's event subjects only, but what an event is about is in its body:
    one on customer A's subject naming customer B's task (or agent) is not B's, nor anyone's."""
    api = secured.api
    a_customer, a_headers = await api.new_customer("a")
    b_customer, b_headers = await api.new_customer("b")
    a_agent = await running_agent(api, a_headers)
    slow = {"provider": "replay", "name": "scripted", "responses": ["late"], "delay_ms": 60_000}
    b_agent = await running_agent(api, b_headers, model=slow, tools=[])
    b_task = await start_task(api, b_headers, b_agent["id"])  # runs until it is cancelled
    violations = Violations()
    nc = await connect_as(secured, a_agent["id"], violations)
    try:
        js = nc.jetstream(timeout=5)
        about = {"task_id": b_task, "agent_id": b_agent["id"], "customer_id": b_customer}
        for forged in (
            {"kind": "message", "source": "calc", "content": "forged", **about},
            {"kind": "usage", "data": {"prompt_tokens": 999999, "completion_tokens": 999999}, **about},
            {"kind": "result", "content": "forged", **about},
            {"kind": "status", "content": "completed", **about},
        ):
            await js.publish(f"caravan.events.{a_customer}.task.{b_task}", json.dumps(forged).encode())
    finally:
        await nc.close()
    cancelled = await api.client.post(f"/v1/tasks/{b_task}/cancel", headers=b_headers)
    assert cancelled.status_code == 202, cancelled.text
    task = await finished(api, b_headers, b_task)  # folded after the forged events, which came first
    assert task["status"] == "cancelled" and task["result"] is None
    assert [m["content"] for m in task["messages"] if m["content"] == "forged"] == []
    assert task["usage"] == {"prompt_tokens": 0, "completion_tokens": 0}


async def test_an_acknowledgement_naming_another_customers_agent_answers_for_nothing(secured: Secured) -> None:
    """A killswitch counts an agent's acknowledgement on that agent's own subject only: customer A's agent,
    saying on A's subjects that B's agent resumed, does not make a release of B's agent look heard while B's
    agent (stopped here) has heard nothing."""
    api = secured.api
    a_customer, a_headers = await api.new_customer("a")
    b_customer, b_headers = await api.new_customer("b")
    a_agent = await running_agent(api, a_headers)
    b_agent = await running_agent(api, b_headers)
    admin = await api.admin()
    target = {"scope": "agent", "agent_id": b_agent["id"]}
    engaged = await api.client.post("/v1/admin/killswitch", json={**target, "reason": "drill"}, headers=admin)
    assert engaged.status_code == 200 and engaged.json()["unacknowledged"] == [], engaged.text
    b_ready = (await agent_ready(api, b_customer, b_agent["id"]))["data"]  # (its process's pid and allocation)
    forged = {
        "kind": "killswitch",
        "agent_id": b_agent["id"],
        "customer_id": b_customer,
        "data": {"halted": False, "flag_ids": [], "alloc_id": b_ready["alloc_id"]},
    }
    violations = Violations()
    nc = await connect_as(secured, a_agent["id"], violations)

    async def forge() -> None:
        while True:
            await nc.publish(f"caravan.events.{a_customer}.agent.{a_agent['id']}", json.dumps(forged).encode())
            await asyncio.sleep(0.02)

    forging = asyncio.create_task(forge())
    try:
        with stalled(b_ready["pid"]):
            released = await api.client.post(
                "/v1/admin/killswitch",
                json={**target, "engaged": False, "reason": "drill over", "wait_ms": 1000},
                headers=admin,
            )
    finally:
        forging.cancel()
        await nc.close()
    assert released.status_code == 200, released.text
    assert (released.json()["acknowledged"], released.json()["unacknowledged"]) == (0, [b_agent["id"]])
    assert violations.errors == []  # A's agent published on its own subject: permitted, and counted for nothing


async def test_the_platform_user_cannot_delete_the_audit_log_and_strangers_cannot_connect(secured: Secured) -> None:
    control = secured.auth.control()
    violations = Violations()
    nc = await nats.connect(secured.url, user=control.user, password=control.password, error_cb=violations.record)
    try:
        js = nc.jetstream(timeout=2)
        before = (await js.stream_info(AUDIT_STREAM)).state.messages
        with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError, nats.js.errors.Error)):
            await js.purge_stream(AUDIT_STREAM)
        with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError, nats.js.errors.Error)):
            await js.delete_stream(AUDIT_STREAM)
        limited = dataclasses.replace((await js.stream_info(AUDIT_STREAM)).config, max_msgs=1)
        with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError, nats.js.errors.Error)):
            await js.update_stream(limited)  # a limit would purge it by another name
        await violations.seen(f'Permissions Violation for Publish to "$JS.API.STREAM.UPDATE.{AUDIT_STREAM}')
        assert (await js.stream_info(AUDIT_STREAM)).config.max_msgs == -1
        assert (await js.stream_info(AUDIT_STREAM)).state.messages >= before
    finally:
        await nc.close()
    for user, password in ((None, None), ("agent-ag-000000000000", "guess")):
        with pytest.raises((nats.errors.Error, OSError, asyncio.TimeoutError)):
            await nats.connect(
                secured.url,
                user=user,
                password=password,
                max_reconnect_attempts=0,
                allow_reconnect=False,
                connect_timeout=2,
            )


async def test_the_watching_user_the_banner_prints_hears_events_and_can_do_nothing_else(secured: Secured) -> None:
    api = secured.api
    customer_id, headers = await api.new_customer()
    watcher, violations = secured.auth.watcher(), Violations()
    nc = await nats.connect(secured.url, user=watcher.user, password=watcher.password, error_cb=violations.record)
    try:
        heard = await nc.subscribe("caravan.events.>")
        agent = await running_agent(api, headers)
        await finished(api, headers, await start_task(api, headers, agent["id"]))
        subjects = set()
        with contextlib.suppress(nats.errors.TimeoutError):
            while True:
                subjects.add((await heard.next_msg(timeout=1)).subject)
        assert f"caravan.events.{customer_id}.agent.{agent['id']}" in subjects
        assert any(s.startswith(f"caravan.events.{customer_id}.task.") for s in subjects)
        # it may not act: no publish (a killswitch flag, a cancel, an event), no JetStream, no team run's subjects
        await nc.publish(f"caravan.ctl.{customer_id}.cancel.{agent['id']}", b"{}")
        await nc.flush()
        await violations.seen('Permissions Violation for Publish to "caravan.ctl.')
        with pytest.raises(nats.errors.TimeoutError):
            await nc.jetstream(timeout=1).stream_info(AUDIT_STREAM)
        await nc.subscribe(f"caravan.rt.{customer_id}.>")
        await nc.flush()
        await violations.seen('Permissions Violation for Subscription to "caravan.rt.')
    finally:
        await nc.close()


async def test_a_team_runs_with_its_members_restricted_credentials(secured: Secured) -> None:
    from tests.gateway.teams_support import agents, script, start, task_status, team

    api = secured.api
    _, headers = await api.new_customer()
    specs = {"alice": {"model": script("a1", "a2 DONE")}, "bob": {"model": script("b1", "b2")}}
    made = await agents(api, headers, specs)
    created = await team(
        api,
        headers,
        members=[made[n]["id"] for n in specs],
        mode="round_robin",
        termination={"max_messages": 6, "text_mention": "DONE"},
    )
    task = await task_status(api, headers, await start(api, headers, created["id"], "Count."))
    assert task["status"] == "completed", task["status_reason"]
    assert [m["source"] for m in task["messages"]] == ["user", "alice", "bob", "alice"]


@pytest.mark.parametrize(
    "login",
    [
        ('users = [{user: "operator", password: "op-pw-0123456789abcdef"}]', "operator:op-pw-0123456789abcdef"),
        ('token: "op-token-0123456789abcdef"', "op-token-0123456789abcdef"),
    ],
    ids=["user", "token"],
)
async def test_an_operators_nats_login_written_in_its_url_reaches_agents_but_never_their_job(
    tmp_path: Path, login: tuple[str, str]
) -> None:
    """A NATS of the operator's own that requires a login, written in NATS_URL as nats-py takes it: the agents get
    it by the secret channel and work; the job (which its customer reads, as does anyone who may read jobs in
    Nomad) names the server alone."""
    authorization, userinfo = login
    (tmp_path / "nats").mkdir()
    (tmp_path / "nats" / "auth.conf").write_text(f"authorization {{ {authorization} }}\n")
    async with EmbeddedNats(tmp_path / "nats", auth=True) as server:
        url = server.url.replace("nats://", f"nats://{userinfo}@")
        control = ControlPlane(make_settings(url, tmp_path / "data"))
        async with control, serve_api(control) as api:
            _, headers = await api.new_customer()
            agent = await running_agent(api, headers)
            task = await finished(api, headers, await start_task(api, headers, agent["id"]))
            assert task["status"] == "completed" and task["result"] == "The result is 20."
            job = await api.client.get(f"/v1/agents/{agent['id']}/job", headers=headers)
            assert job.status_code == 200
            assert job.json()["Job"]["TaskGroups"][0]["Tasks"][0]["Env"]["NATS_URL"] == server.url
            assert userinfo.split(":")[-1] not in job.text
