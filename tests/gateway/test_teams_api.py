"""Teams through the API: members in separate agent processes, the manager in the control plane, and the
transcript equal to AgentChat's own team run in this process with the same scripts."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
from datetime import UTC, datetime, timedelta
from typing import Any

import nats
import nats.js.errors
import pytest

from agent.teamprotocol import MemberJoin, TeamTaskRequest, join_subject
from tests.conftest import Api
from tests.gateway.teams_support import (
    MaxMessageTermination,
    TextMentionTermination,
    TokenUsageTermination,
    agent_ready,
    agents,
    api_transcript,
    attempt_messages,
    checkpointed_messages,
    health,
    local_team,
    local_transcript,
    local_usage,
    ready_instances,
    run_local,
    running_event,
    script,
    start,
    stop_reason,
    task_status,
    team,
)
from tests.gateway.test_agents_api import INVISIBLE_NAMES, READABLE_NAMES, nested, wait_status
from tests.gateway.test_tasks_api import queueing_fails, usage
from tests.support.helpers import assert_eventually, now, small_events, small_messages, stored_events


async def test_round_robin_matches_agentchat_in_process(api: Api) -> None:
    _, headers = await api.new_customer()
    specs = {
        "alice": {"model": script("a1", "a2", "a3")},
        "bob": {"model": script("b1", "b2", "b3")},
        "carol": {"model": script("c1", "c2 DONE", "c3")},
    }
    made = await agents(api, headers, specs)
    created = await team(
        api,
        headers,
        members=[made[n]["id"] for n in specs],
        mode="round_robin",
        termination={"max_messages": 9, "text_mention": "DONE"},
    )
    task_id = await start(api, headers, created["id"], "Count, one each.")
    task = await task_status(api, headers, task_id)
    assert task["status"] == "completed", (task["status_reason"], task["messages"])
    local = local_team(specs, "round_robin", MaxMessageTermination(9) | TextMentionTermination("DONE"))
    items, local_stop = await run_local(local, "Count, one each.")
    assert api_transcript(task) == local_transcript(items)
    assert [m["source"] for m in task["messages"]] == ["user", "alice", "bob", "carol", "alice", "bob", "carol"]
    assert task["result"] == "c2 DONE"
    assert await stop_reason(api, headers, task_id) == local_stop


async def test_a_task_whose_transcript_outgrows_a_stored_value_completes_with_every_message(api: Api) -> None:
    """A stored value has a size limit (a NATS server's max_payload: 1 MB unless configured). The transcript is kept
    a message per key, so a conversation longer than that still ends `completed` with every message (a record that
    held its whole transcript stopped being updated there, and the task never showed it ended)."""
    _, headers = await api.new_customer()
    specs = {name: {"model": script(*[f"{name} {i} " + "x" * 3000 for i in range(15)])} for name in ("alice", "bob")}
    made = await agents(api, headers, specs)
    created = await team(api, headers, members=[made[n]["id"] for n in specs], termination={"max_messages": 21})
    async with small_messages(api.control.settings.nats_url, "KV_caravan_tasks", 16 * 1024):
        task_id = await start(api, headers, created["id"], "Count.")
        task = await task_status(api, headers, task_id)
    assert task["status"] == "completed", (task["status_reason"], len(task["messages"]))
    assert [m["content"].split(" ")[:2] for m in task["messages"][1:]] == [
        [name, str(i)] for i in range(10) for name in ("alice", "bob")
    ]
    assert sum(len(m["content"]) for m in task["messages"]) > 16 * 1024 * 3


async def test_an_event_jetstream_will_not_store_fails_the_team_task_with_the_reason(api: Api) -> None:
    """The manager stores the run's messages without waiting on each, but not its result before they are stored:
    one JetStream refuses fails the task, saying why (it used to wait for that acknowledgement forever)."""
    _, headers = await api.new_customer()
    specs = {"alice": {"model": script("a1")}, "bob": {"model": script("b1")}}
    made = await agents(api, headers, specs)
    created = await team(api, headers, members=[made[n]["id"] for n in specs], termination={"max_messages": 3})
    async with small_events(api.control.settings.nats_url):
        task_id = await start(api, headers, created["id"], "Count. " + "Please. " * 1000)
        task = await task_status(api, headers, task_id)
    assert task["status"] == "failed", (task["status_reason"], task["messages"])
    assert "not stored" in task["status_reason"] and "maximum" in task["status_reason"], task["status_reason"]
    assert task["result"] is None


async def test_a_team_task_that_cannot_be_queued_is_refused_503_and_leaves_nothing_behind(api: Api) -> None:
    """As a task on one agent (tests/gateway/test_tasks_api.py): no record, no quota slot, and the client's
    second try made and run once JetStream takes requests again."""
    _, headers = await api.new_customer()
    specs = {"alice": {"model": script("a1")}, "bob": {"model": script("b1")}}
    made = await agents(api, headers, specs)
    created = await team(api, headers, members=[made[n]["id"] for n in specs], termination={"max_messages": 3})
    body = {"team_id": created["id"], "task": "Count."}
    with queueing_fails(api, nats.js.errors.NoStreamResponseError()) as tried:
        response = await api.client.post("/v1/tasks", json=body, headers=headers)
    assert response.status_code == 503, response.text
    task_id = TeamTaskRequest.model_validate_json(tried[0]).task_id
    assert (await api.client.get(f"/v1/tasks/{task_id}", headers=headers)).status_code == 404
    assert (await api.client.get("/v1/tasks", headers=headers)).json() == []
    assert (await usage(api, headers))["concurrent_tasks"] == 0
    task = await task_status(api, headers, await start(api, headers, created["id"], "Count."))
    assert [m["content"] for m in task["messages"]] == ["Count.", "a1", "b1"]


async def test_selector_matches_agentchat_in_process(api: Api) -> None:
    _, headers = await api.new_customer()
    specs = {
        "planner": {"model": script("p1", "p2")},
        "coder": {"model": script("c1", "c2")},
        "critic": {"model": script("k1", "k2")},
    }
    made = await agents(api, headers, specs)
    selector_model = script("coder", "critic", "planner", "coder")
    created = await team(
        api,
        headers,
        members=[made[n]["id"] for n in specs],
        mode="selector",
        selector={"model": selector_model},
        termination={"max_messages": 5},
    )
    task_id = await start(api, headers, created["id"], "Write a function.")
    task = await task_status(api, headers, task_id)
    assert task["status"] == "completed", (task["status_reason"], task["messages"])
    local = local_team(specs, "selector", MaxMessageTermination(5), selector_model=selector_model)
    items, local_stop = await run_local(local, "Write a function.")
    assert api_transcript(task) == local_transcript(items)
    assert [m["source"] for m in task["messages"]] == ["user", "coder", "critic", "planner", "coder"]
    assert await stop_reason(api, headers, task_id) == local_stop


def transfer(to: str) -> dict[str, object]:
    return {"tool": f"transfer_to_{to}", "arguments": {}}


async def test_swarm_handoffs_match_agentchat_in_process(api: Api) -> None:
    _, headers = await api.new_customer()
    specs = {
        "triage": {"model": script(transfer("billing"), "Anything else? DONE")},
        "billing": {"model": script("Refund issued.", transfer("triage"))},
    }
    made = await agents(api, headers, specs)
    ids = {n: made[n]["id"] for n in specs}
    created = await team(
        api,
        headers,
        members=list(ids.values()),
        mode="swarm",
        handoffs={ids["triage"]: [ids["billing"]], ids["billing"]: [ids["triage"]]},
        termination={"text_mention": "DONE", "max_messages": 20},
    )
    task_id = await start(api, headers, created["id"], "I want a refund.")
    task = await task_status(api, headers, task_id)
    assert task["status"] == "completed", (task["status_reason"], task["messages"])
    handoffs = {"triage": ["billing"], "billing": ["triage"]}
    local = local_team(specs, "swarm", TextMentionTermination("DONE") | MaxMessageTermination(20), handoffs)
    items, local_stop = await run_local(local, "I want a refund.")
    assert api_transcript(task) == local_transcript(items)
    kinds = [(m["source"], m["type"]) for m in task["messages"]]
    assert ("triage", "HandoffMessage") in kinds and ("billing", "HandoffMessage") in kinds
    assert await stop_reason(api, headers, task_id) == local_stop


async def test_a_swarm_member_that_cannot_hand_off_to_a_namesake_of_its_tool_is_refused_or_fails_at_once(
    api: Api,
) -> None:
    """AgentChat refuses a member whose handoff target is named as one of its tools. Such a team is refused (422,
    nothing stored); one that comes to be so afterwards (a tool given to a member) fails its task with AgentChat's
    reason as the member refuses to join, where the run waited 30 s for it and said it "did not join: is it
    running?"."""
    _, headers = await api.new_customer()
    specs = {
        "triage": {"model": script(transfer("calculator")), "tools": ["calculator"]},
        "calculator": {"model": script("4")},
        "calc": {"model": script(transfer("calculator"))},
    }
    made = await agents(api, headers, specs)
    triage, namesake, calc = (made[name]["id"] for name in specs)
    swarm = {"mode": "swarm", "termination": {"max_messages": 4}}
    body = {"members": [triage, namesake], "handoffs": {triage: [namesake]}, **swarm}
    refused = await api.client.post("/v1/teams", json={"name": "t", **body}, headers=headers)
    assert refused.status_code == 422, refused.text
    message = refused.json()["error"]["message"]
    assert f"{triage} (triage) may hand off to calculator, the name of one of its own tools" in message, message
    assert (await api.client.get("/v1/teams", headers=headers)).json() == []

    created = await team(api, headers, members=[calc, namesake], handoffs={calc: [namesake]}, **swarm)
    tooled = await api.client.patch(f"/v1/agents/{calc}", json={"tools": ["calculator"]}, headers=headers)
    assert tooled.status_code == 200, tooled.text
    await wait_status(api, headers, calc, "running")
    task = await task_status(api, headers, await start(api, headers, created["id"], "2+2?"))
    assert task["status"] == "failed", task
    reason = "team member calc ({}) could not join: ValueError: Handoff names must be unique from tool names"
    assert task["status_reason"] == reason.format(calc), task["status_reason"]


async def test_cancel_stops_a_model_call_in_another_process(api: Api) -> None:
    customer_id, headers = await api.new_customer()
    specs = {"fast": {"model": script("f1", "f2")}, "slow": {"model": script("too late", delay_ms=60_000)}}
    made = await agents(api, headers, specs)
    created = await team(
        api, headers, members=[made["fast"]["id"], made["slow"]["id"]], termination={"max_messages": 6}
    )
    port = (await agent_ready(api, customer_id, made["slow"]["id"]))["data"]["health_port"]
    task_id = await start(api, headers, created["id"], "Go.")
    await assert_eventually(lambda: health(port), lambda h: h["team_handlers"] >= 1, what="model call in flight")
    response = await api.client.post(f"/v1/tasks/{task_id}/cancel", headers=headers)
    assert response.status_code == 202
    task = await task_status(api, headers, task_id, within=20)
    assert task["status"] == "cancelled" and task["result"] is None
    assert [m["source"] for m in task["messages"]] == ["user", "fast"]
    # the model call in the slow member's process ended, and it dropped its part of the run
    await assert_eventually(
        lambda: health(port), lambda h: h["team_handlers"] == 0 and h["team_runs"] == 0, what="member idle"
    )
    assert (await api.client.post(f"/v1/tasks/{task_id}/cancel", headers=headers)).status_code == 409


class _Away:
    """The team runner's task records, unreadable (as while NATS is briefly away) until ``back`` is set."""

    def __init__(self, records: Any) -> None:
        self.records, self.back, self.failed = records, asyncio.Event(), 0

    async def get(self, key: str) -> Any:
        if not self.back.is_set():
            self.failed += 1
            raise nats.errors.TimeoutError
        return await self.records.get(key)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.records, name)


@pytest.mark.parametrize("cancel", [False, True])
async def test_a_run_whose_runner_failed_comes_back_and_ends(
    api: Api, monkeypatch: pytest.MonkeyPatch, cancel: bool
) -> None:
    """A team runner that fails outside the conversation (here reading the task's record while NATS is briefly
    away) hands the run back to come again a little later. It used to take the run off the queue: the task stayed
    `queued` for good, and a cancel (202), which tells the run, could not end it either."""
    _, headers = await api.new_customer()
    specs = {"alice": {"model": script("a1", "a2")}, "bob": {"model": script("b1", "b2")}}
    made = await agents(api, headers, specs)
    created = await team(api, headers, members=[made[n]["id"] for n in specs], termination={"max_messages": 3})
    away = _Away(api.control.team_runner._tasks)
    monkeypatch.setattr(api.control.team_runner, "_tasks", away)
    task_id = await start(api, headers, created["id"], "Go.")
    await assert_eventually(now(lambda: away.failed), lambda n: n >= 2, what="the run back after its first failure")
    if cancel:
        assert (await api.client.post(f"/v1/tasks/{task_id}/cancel", headers=headers)).status_code == 202
    away.back.set()
    task = await task_status(api, headers, task_id)
    if cancel:
        assert (task["status"], task["status_reason"]) == ("cancelled", "cancelled on request"), task
    else:
        assert task["status"] == "completed", task
        items, _ = await run_local(local_team(specs, "round_robin", MaxMessageTermination(3)), "Go.")
        assert api_transcript(task) == local_transcript(items)
    assert (await api.client.get("/v1/usage", headers=headers)).json()["concurrent_tasks"] == 0


async def test_a_team_task_cancelled_while_its_members_start_never_runs(api: Api) -> None:
    """A manager that took the run up waits for the members to start and join; cancelled meanwhile, the task ends
    `cancelled` and the team never runs, not even once its members are up."""
    customer_id, headers = await api.new_customer()
    members = []
    for name in ("writer", "critic"):
        body = {"name": name, "model": script(f"{name} speaks")}
        response = await api.client.post("/v1/agents", json=body, headers=headers)
        assert response.status_code == 201, response.text
        members.append(response.json()["id"])
    created = await team(api, headers, members=members, termination={"max_messages": 3})
    task_id = await start(api, headers, created["id"], "Go.")
    runner = api.control.team_runner
    await assert_eventually(now(lambda: runner.running), lambda n: n == 1, what="a manager took the run up")
    response = await api.client.post(f"/v1/tasks/{task_id}/cancel", headers=headers)
    assert response.status_code == 202 and response.json()["status"] == "queued"
    assert (await task_status(api, headers, task_id))["status"] == "cancelled"
    for agent_id in members:
        await wait_status(api, headers, agent_id, "running", 40)
    await assert_eventually(now(lambda: runner.running), lambda n: n == 0, what="the manager let the run go")
    events = await stored_events(api.control.jet.js, customer_id, task_id)
    said = [(e.kind, e.content) for e in events if not str(e.data.get("reason") or "").startswith("waiting up to")]
    assert said == [("status", "queued"), ("status", "cancelled")]  # and, meanwhile, that it waited for them:
    assert {(e.kind, e.content) for e in events[1:-1]} == {("status", "queued")}


async def test_a_member_that_dies_mid_turn_is_restarted_and_the_run_goes_on_from_its_last_message(api: Api) -> None:
    customer_id, headers = await api.new_customer()
    specs = {
        "steady": {"model": script("s1", "s2", "s3")},
        "fragile": {"model": script("f1", "f2", "f3", delay_ms=1500)},
    }
    made = await agents(api, headers, specs)
    created = await team(
        api, headers, members=[made["steady"]["id"], made["fragile"]["id"]], termination={"max_messages": 7}
    )
    ready = (await agent_ready(api, customer_id, made["fragile"]["id"]))["data"]
    task_id = await start(api, headers, created["id"], "Go.")
    # kill it in its second turn, once a checkpoint holds four messages (user, s1, f1, s2)
    saved = await assert_eventually(
        lambda: checkpointed_messages(api, customer_id, task_id), lambda m: len(m) >= 4, what="a checkpoint"
    )
    port = ready["health_port"]
    await assert_eventually(lambda: health(port), lambda h: h["team_handlers"] >= 1, what="model call in flight")
    os.kill(ready["pid"], signal.SIGKILL)
    task = await task_status(api, headers, task_id, within=90)
    assert task["status"] == "completed", (task["status_reason"], task["messages"])
    assert task["attempt"] == 2
    local = local_team(specs, "round_robin", MaxMessageTermination(7))
    items, local_stop = await run_local(local, "Go.")
    assert api_transcript(task) == local_transcript(items)  # nothing lost, nothing twice, and it stopped at 7
    assert task["usage"] == local_usage(items)  # the members' model contexts came back whole
    metered = (await api.client.get("/v1/usage", headers=headers)).json()["tokens_today"]
    assert metered == sum(task["usage"].values())  # what the new attempt published again was not metered again
    assert task["status_reason"] == local_stop
    # the new attempt published again what was said before the crash, and its run asked nobody to say it again
    replayed, produced = await attempt_messages(api, headers, task_id, 2)
    assert replayed[: len(saved)] == saved
    assert replayed + produced == [(m["source"], m["content"]) for m in task["messages"]]
    assert produced and produced[0][0] == "fragile" and "s1" not in [c for _, c in produced]


async def test_a_run_whose_member_dies_in_its_last_attempt_fails_saying_so(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As any failed task: the reason in its status and an error event before it (this way of failing had none)."""
    runner = api.control.team_runner
    monkeypatch.setattr(runner, "config", dataclasses.replace(runner.config, max_attempts=1))
    customer_id, headers = await api.new_customer()
    specs = {"steady": {"model": script("s1", "s2")}, "fragile": {"model": script("f1", "f2", delay_ms=1500)}}
    made = await agents(api, headers, specs)
    created = await team(
        api, headers, members=[made["steady"]["id"], made["fragile"]["id"]], termination={"max_messages": 5}
    )
    ready = (await agent_ready(api, customer_id, made["fragile"]["id"]))["data"]
    task_id = await start(api, headers, created["id"], "Go.")
    port = ready["health_port"]
    await assert_eventually(lambda: health(port), lambda h: h["team_handlers"] >= 1, what="model call in flight")
    os.kill(ready["pid"], signal.SIGKILL)
    task = await task_status(api, headers, task_id, within=90)
    assert (task["status"], task["attempt"]) == ("failed", 1), task
    assert f"member {made['fragile']['id']}" in task["status_reason"], task["status_reason"]
    assert task["status_reason"].endswith("(gave up after 1 attempts)"), task["status_reason"]
    events = await stored_events(api.control.jet.js, customer_id, task_id)
    assert [(e.kind, e.content) for e in events[-2:]] == [("error", task["status_reason"]), ("status", "failed")]


async def test_replicas_share_team_runs_and_none_is_served_twice(api: Api) -> None:
    customer_id, headers = await api.new_customer()
    specs = {"lead": {"model": script("l1")}, "pool": {"model": script("p1", delay_ms=200), "replicas": 2}}
    made = await agents(api, headers, specs)
    await assert_eventually(
        lambda: ready_instances(api, customer_id, made["pool"]["id"]), lambda s: len(s) == 2, what="both replicas up"
    )
    members = [made["lead"]["id"], made["pool"]["id"]]
    created = await team(api, headers, members=members, termination={"max_messages": 3})
    task_ids = await asyncio.gather(*(start(api, headers, created["id"], f"job {i}") for i in range(12)))
    tasks = await asyncio.gather(*(task_status(api, headers, t) for t in task_ids))
    for i, task in enumerate(tasks):
        assert task["status"] == "completed", task
        assert [(m["source"], m["content"]) for m in task["messages"]] == [
            ("user", f"job {i}"),
            ("lead", "l1"),
            ("pool", "p1"),
        ]
        assert task["attempt"] == 1
    hosts = {(await running_event(api, headers, t))["members"]["pool"] for t in task_ids}
    assert len(hosts) == 2, hosts  # both replicas took runs (each run stays on one)


async def test_a_team_cannot_reach_another_customers_agents(api: Api) -> None:
    alice_id, alice = await api.new_customer("alice")
    _, bob = await api.new_customer("bob")
    mine = await agents(api, alice, {"mine": {"model": script("m1")}})
    theirs = await agents(api, bob, {"theirs": {"model": script("t1")}})
    body = {"members": [mine["mine"]["id"], theirs["theirs"]["id"]], "termination": {"max_messages": 3}}
    refused = await api.client.post("/v1/teams", json={"name": "mixed", **body}, headers=alice)
    assert refused.status_code == 404, refused.text
    assert (await api.client.get("/v1/teams", headers=alice)).json() == []
    own = await team(api, alice, members=[mine["mine"]["id"]], termination={"max_messages": 2})
    for method, path, json_body in [
        ("GET", f"/v1/teams/{own['id']}", None),
        ("DELETE", f"/v1/teams/{own['id']}", None),
        ("POST", "/v1/tasks", {"team_id": own["id"], "task": "x"}),
    ]:
        assert (await api.client.request(method, path, json=json_body, headers=bob)).status_code == 404, path
    # on the wire: a join for bob's agent in alice's namespace reaches nobody
    nc = await nats.connect(api.control.settings.nats_url)
    try:
        join = MemberJoin(
            run_id="rn-000000000001",
            task_id="tk-000000000001",
            customer_id=alice_id,
            agent_id=theirs["theirs"]["id"],
            team_key="rn-000000000001",
        )
        with pytest.raises(nats.errors.NoRespondersError):
            await nc.request(join_subject(alice_id, theirs["theirs"]["id"]), join.model_dump_json().encode(), timeout=2)
    finally:
        await nc.close()


async def test_team_input_is_validated_and_nothing_is_half_written(api: Api) -> None:
    _, headers = await api.new_customer()
    made = await agents(api, headers, {"one": {"model": script("1")}, "two": {"model": script("2")}})
    one, two = made["one"]["id"], made["two"]["id"]
    terminated = {"termination": {"max_messages": 2}}
    bad = [
        {"name": "t", "members": [], "termination": {"max_messages": 2}},
        {"name": "t", "members": [one, one], "termination": {"max_messages": 2}},
        {"name": "t", "members": [one], "termination": {}},
        {"name": "t", "members": [one], "mode": "chaos", "termination": {"max_messages": 2}},
        {"name": "t", "members": [one], "mode": "selector", "termination": {"max_messages": 2}},
        {"name": "t", "members": [one, two], "mode": "swarm", "termination": {"max_messages": 2}},
        {"name": "t", "members": [one], "handoffs": {two: ["user"]}, "termination": {"max_messages": 2}},
        {"name": "t", "members": [one], "termination": {"handoff_to_user": True}},
        {"name": "t", "members": ["../../etc"], "termination": {"max_messages": 2}},
        {"name": "t", "members": [one], "termination": {"max_messages": 0}},
        {"name": "t", "members": [one], "termination": {"max_messages": 2}, "extra": 1},
        # numbers and booleans are JSON's own, as an agent's: "3", 2.0 or true was taken for a count
        *(
            {"name": "t", "members": [one], "termination": termination}
            for termination in (
                {"max_messages": "3"},
                {"max_messages": 2.0},
                {"max_messages": True},
                {"timeout_s": "5"},
                {"max_tokens": "100"},
                {"max_messages": 2, "handoff_to_user": "yes"},
            )
        ),
        {
            "name": "t",
            "members": [one, two],
            "mode": "selector",
            "selector": {"model": script("one"), "allow_repeated_speaker": "yes"},
            **terminated,
        },
        # a swarm's handoff to the user, without stopping for it: AgentChat fails the run (no member "user")
        {"name": "t", "members": [one, two], "mode": "swarm", "handoffs": {one: [two], two: ["user"]}, **terminated},
        # a selector chooses among two members at least (AgentChat refused every task on such a team)
        {"name": "t", "members": [one], "mode": "selector", "selector": {"model": script("one")}, **terminated},
        # a selector's answer names a member: a scripted tool call failed every task with a bare AssertionError
        {
            "name": "t",
            "members": [one, two],
            "mode": "selector",
            "selector": {"model": script({"tool": "transfer_to_one", "arguments": {}})},
            **terminated,
        },
    ]
    deep = {"provider": "replay", "name": "s", "responses": [{"tool": "pick", "arguments": nested(220)}]}
    bad.append({"name": "t", "members": [one, two], "mode": "selector", "selector": {"model": deep}, **terminated})
    # str.format's fields beyond the three names: attributes, items, conversions and widths (a gigabyte's prompt)
    for prompt in (
        "{nope}",
        "{roles.x}",
        "{roles[a]}",
        "{roles.__class__}",
        "{history!r}",
        "{history:>999999999}",
        "{",
    ):
        selector = {"model": script("one"), "prompt": prompt}
        bad.append({"name": "t", "members": [one, two], "mode": "selector", "selector": selector, **terminated})
    for body in bad:
        response = await api.client.post("/v1/teams", json=body, headers=headers)
        assert response.status_code == 422, (body, response.text)
        assert response.json()["error"]["code"] == "invalid"
    missing = await api.client.post(
        "/v1/teams",
        json={"name": "t", "members": ["ag-000000000000"], "termination": {"max_messages": 2}},
        headers=headers,
    )
    assert missing.status_code == 404
    # two agents of one name (names need not be unique among agents): the refusal names both
    namesake = (await agents(api, headers, {"one": {"model": script("1")}}))["one"]["id"]
    clash = await api.client.post(
        "/v1/teams", json={"name": "t", "members": [one, namesake], **terminated}, headers=headers
    )
    assert clash.status_code == 422, clash.text
    assert f"{one} and {namesake} are both named 'one'" in clash.json()["error"]["message"], clash.text
    assert (await api.client.get("/v1/teams", headers=headers)).json() == []
    for body in ({"team_id": "tm-000000000000", "task": "x"}, {"team_id": "nope", "task": "x"}):
        assert (await api.client.post("/v1/tasks", json=body, headers=headers)).status_code in (404, 422)
    assert (await api.client.get("/v1/tasks", headers=headers)).json() == []


async def test_team_names_that_hide_or_reorder_text_are_refused_and_nothing_is_stored(api: Api) -> None:
    _, headers = await api.new_customer()
    member = await api.client.post("/v1/agents", json={"name": "solo", "model": script("hi")}, headers=headers)
    body = {"members": [member.json()["id"]], "termination": {"max_messages": 2}}
    for name in INVISIBLE_NAMES:
        refused = await api.client.post("/v1/teams", json={**body, "name": name}, headers=headers)
        assert refused.status_code == 422, (name, refused.text)
        error = refused.json()["error"]
        assert error["code"] == "invalid" and error["details"][0]["field"] == "name", error
    assert (await api.client.get("/v1/teams", headers=headers)).json() == []
    for name in READABLE_NAMES:
        created = await api.client.post("/v1/teams", json={**body, "name": name}, headers=headers)
        assert created.status_code == 201 and created.json()["name"] == name, created.text


async def test_a_team_task_whose_model_endpoint_cannot_be_reached_fails_naming_it(api: Api) -> None:
    """A member's model (in its agent's process) or the selector's (in the control plane) that cannot be reached
    fails the task with the endpoint named, as a single agent's task does; both used to say only
    ``APIConnectionError: Connection error.``"""
    _, headers = await api.new_customer()
    unreachable = {"provider": "ollama", "name": "llama3", "base_url": "http://models.invalid:11434/v1"}
    made = await agents(api, headers, {"alice": {"model": unreachable}, "bob": {"model": script("b1", "b2")}})
    members = [made["alice"]["id"], made["bob"]["id"]]
    selector = {"model": unreachable}
    said = "cannot reach the model endpoint (POST http://models.invalid:11434/v1/chat/completions): cannot look up"
    for body, who in (({}, "member alice: APIConnectionError: "), ({"mode": "selector", "selector": selector}, "")):
        created = await team(api, headers, members=members, termination={"max_messages": 3}, **body)
        task = await task_status(api, headers, await start(api, headers, created["id"], "Count."))
        assert task["status"] == "failed", task
        assert task["status_reason"].startswith(who + said), task["status_reason"]  # and which member it was


async def test_a_selector_model_at_an_internal_address_is_refused_and_nothing_is_stored(api: Api) -> None:
    """The selector's model is called from the control plane itself: its base_url must not point at the platform's
    network either."""
    _, headers = await api.new_customer()
    made = await agents(api, headers, {"one": {"model": script("hi")}, "two": {"model": script("hi")}})
    selector = {"model": {"provider": "ollama", "name": "m", "base_url": "http://[::ffff:10.0.0.1]:4646/v1"}}
    body = {
        "members": [a["id"] for a in made.values()],
        "mode": "selector",
        "selector": selector,
        "termination": {"max_messages": 2},
    }
    refused = await api.client.post("/v1/teams", json={**body, "name": "picky"}, headers=headers)
    assert refused.status_code == 422, refused.text
    error = refused.json()["error"]
    assert error["details"][0]["field"] == "selector.model.base_url" and "internal address" in error["message"]
    assert (await api.client.get("/v1/teams", headers=headers)).json() == []


async def test_a_selector_model_the_platform_has_no_key_for_is_refused_and_nothing_is_stored(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    _, headers = await api.new_customer()
    made = await agents(api, headers, {"one": {"model": script("hi")}, "two": {"model": script("hi")}})
    body = {
        "name": "picky",
        "members": [a["id"] for a in made.values()],
        "mode": "selector",
        "selector": {"model": {"provider": "openai", "name": "gpt-4o-mini"}},
        "termination": {"max_messages": 2},
    }
    refused = await api.client.post("/v1/teams", json=body, headers=headers)
    assert refused.status_code == 422, refused.text
    error = refused.json()["error"]
    assert error["details"][0]["field"] == "selector.model.provider" and "OPENAI_API_KEY" in error["message"]
    assert (await api.client.get("/v1/teams", headers=headers)).json() == []


async def test_teams_crud(api: Api) -> None:
    _, headers = await api.new_customer()
    made = await agents(api, headers, {"solo": {"model": script("hi")}})
    created = await team(api, headers, members=[made["solo"]["id"]], termination={"max_messages": 2})
    assert created["mode"] == "round_robin" and created["id"].startswith("tm-")
    assert [t["id"] for t in (await api.client.get("/v1/teams", headers=headers)).json()] == [created["id"]]
    assert (await api.client.get(f"/v1/teams/{created['id']}", headers=headers)).json() == created
    task = await task_status(api, headers, await start(api, headers, created["id"], "hello"))
    assert task["status"] == "completed" and task["team_id"] == created["id"] and task["result"] == "hi"
    assert (await api.client.delete(f"/v1/teams/{created['id']}", headers=headers)).status_code == 204
    assert (await api.client.get(f"/v1/teams/{created['id']}", headers=headers)).status_code == 404
    input_on_agent_task = await api.client.post(f"/v1/tasks/{task['id']}/input", json={"content": "x"}, headers=headers)
    assert input_on_agent_task.status_code == 409


async def test_a_token_budget_ends_the_run_where_agentchat_ends_it(api: Api) -> None:
    _, headers = await api.new_customer()
    specs = {
        "alice": {"model": script("one two three", "four five six", "seven eight", "nine")},
        "bob": {"model": script("ten eleven", "twelve thirteen", "fourteen", "fifteen")},
    }
    made = await agents(api, headers, specs)
    created = await team(
        api, headers, members=[made[n]["id"] for n in specs], termination={"max_tokens": 40, "max_messages": 9}
    )
    task_id = await start(api, headers, created["id"], "Count with me.")
    task = await task_status(api, headers, task_id)
    local = local_team(specs, "round_robin", TokenUsageTermination(max_total_token=40) | MaxMessageTermination(9))
    items, local_stop = await run_local(local, "Count with me.")
    assert local_stop is not None and local_stop.startswith("Token usage limit reached")
    assert task["status"] == "completed" and task["status_reason"] == local_stop
    assert api_transcript(task) == local_transcript(items)
    assert len(task["messages"]) < 9
    assert task["usage"]["prompt_tokens"] + task["usage"]["completion_tokens"] >= 40
    assert await stop_reason(api, headers, task_id) == local_stop


async def test_a_handoff_to_the_user_that_is_not_what_stops_the_team_ends_the_task_as_agentchat_does(api: Api) -> None:
    """A round robin whose member hands off to the user is asked nothing unless `handoff_to_user` stops the team:
    when `max_messages` ends the run on that handoff, the task completes with AgentChat's stop reason (it waited
    for the human, and then ran on past the limit)."""
    _, headers = await api.new_customer()
    specs = {
        "asker": {"model": script({"tool": "transfer_to_user", "arguments": {}}, "a2")},
        "maker": {"model": script("m1", "m2")},
    }
    made = await agents(api, headers, specs)
    asker = made["asker"]["id"]
    members = [made["maker"]["id"], asker]  # the task, m1, then the asker's handoff: the third message
    created = await team(api, headers, members=members, handoffs={asker: ["user"]}, termination={"max_messages": 3})
    task = await task_status(api, headers, await start(api, headers, created["id"], "Paint the fence."))
    local = local_team(dict(reversed(specs.items())), "round_robin", MaxMessageTermination(3), {"asker": ["user"]})
    items, local_stop = await run_local(local, "Paint the fence.")
    assert local_stop is not None and local_stop.startswith("Maximum number of messages 3 reached")
    assert (task["status"], task["status_reason"]) == ("completed", local_stop), task
    assert api_transcript(task) == local_transcript(items)
    assert [m["type"] for m in task["messages"]][-1] == "HandoffMessage"


async def test_a_timeout_ends_the_run_after_the_message_that_crosses_it(api: Api) -> None:
    _, headers = await api.new_customer()
    many = [f"m{i}" for i in range(30)]
    made = await agents(api, headers, {"talker": {"model": script(*many, delay_ms=300)}})
    created = await team(api, headers, members=[made["talker"]["id"]], termination={"timeout_s": 1, "max_messages": 31})
    task_id = await start(api, headers, created["id"], "Talk.")
    task = await task_status(api, headers, task_id)
    assert task["status"] == "completed", (task["status_reason"], task["messages"])
    assert task["status_reason"] == "Timeout of 1.0 seconds reached"
    assert await stop_reason(api, headers, task_id) == task["status_reason"]
    said = [m["content"] for m in task["messages"][1:]]
    assert said and said == many[: len(said)] and len(said) < 30  # in order, and it stopped early


async def test_a_team_deleted_as_a_task_is_made_on_it_runs_no_task(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """A delete finds a team's unfinished tasks by their records; a task read its team but has no record yet
    when the whole delete runs: the task, once queued, reads its team again and ends, taken out of the queue, its
    quota slot given back. A delete that is refused (an unfinished task) leaves the team as it was."""
    _, headers = await api.new_customer()
    made = await agents(api, headers, {"solo": {"model": script("hi", delay_ms=1_000)}})
    crew = await team(api, headers, members=[made["solo"]["id"]], termination={"max_messages": 2})
    first = await start(api, headers, crew["id"], "running")
    assert (await api.client.delete(f"/v1/teams/{crew['id']}", headers=headers)).status_code == 409
    second = await start(api, headers, crew["id"], "after the refused delete")  # not left marked as deleting
    for task_id in (first, second):
        assert (await task_status(api, headers, task_id))["status"] == "completed"

    dispatch = api.control.tasks._teams
    assert dispatch is not None
    prepare, deletes = dispatch.prepare, []

    async def deleted_meanwhile(*args: Any) -> Any:
        prepared = await prepare(*args)
        deletes.append(await api.client.delete(f"/v1/teams/{crew['id']}", headers=headers))
        return prepared

    monkeypatch.setattr(dispatch, "prepare", deleted_meanwhile)
    made_meanwhile = await api.client.post("/v1/tasks", json={"team_id": crew["id"], "task": "go"}, headers=headers)
    assert [r.status_code for r in deletes] == [204] and made_meanwhile.status_code == 202, made_meanwhile.text
    ended = await task_status(api, headers, made_meanwhile.json()["id"])
    assert (ended["status"], ended["status_reason"]) == ("cancelled", f"team {crew['id']} was deleted"), ended
    assert ended["messages"] == []  # no member ran it
    assert (await usage(api, headers))["concurrent_tasks"] == 0


async def test_a_task_made_while_a_delete_of_its_team_is_refused_runs(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A delete marks the team, then looks for its unfinished tasks; a task queued in between used to see the mark
    and end `cancelled` ("being deleted") even when the delete was then refused (409) and the team stayed. It waits
    for the delete's outcome now: the team stays, so the task runs."""
    customer_id, headers = await api.new_customer()
    made = await agents(api, headers, {"solo": {"model": script("hi")}})
    crew = await team(api, headers, members=[made["solo"]["id"]], termination={"max_messages": 2})
    repo, key = api.control.teams._repo, f"{customer_id}.{crew['id']}"
    dispatch = api.control.tasks._teams
    assert dispatch is not None
    prepare = dispatch.prepare

    async def refused_delete() -> None:  # what TeamService.delete does when it finds an unfinished task
        await asyncio.sleep(0.5)
        await repo.update(key, lambda t: t.model_copy(update={"deleting_until": None}))

    async def delete_under_way(*args: Any) -> Any:
        prepared = await prepare(*args)
        until = datetime.now(UTC) + timedelta(seconds=30)
        await repo.update(key, lambda t: t.model_copy(update={"deleting_until": until}))
        background.append(asyncio.create_task(refused_delete()))
        return prepared

    background: list[asyncio.Task[None]] = []
    monkeypatch.setattr(dispatch, "prepare", delete_under_way)
    made_meanwhile = await api.client.post("/v1/tasks", json={"team_id": crew["id"], "task": "go"}, headers=headers)
    assert made_meanwhile.status_code == 202, made_meanwhile.text
    await asyncio.gather(*background)
    ended = await task_status(api, headers, made_meanwhile.json()["id"])
    assert ended["status"] == "completed", ended
    assert [m["content"] for m in ended["messages"]] == ["go", "hi"]


async def test_no_agent_is_named_user_nor_joins_a_team_so_named(api: Api) -> None:
    """``user`` is the human in AgentChat: a member so named wrote as the human did in the transcript, and a swarm
    with a handoff to the human was stored but failed every task ("Handoff names must be unique")."""
    customer_id, headers = await api.new_customer()
    refused = await api.client.post("/v1/agents", json={"name": "user", "model": script("hi")}, headers=headers)
    assert refused.status_code == 422 and "the human's name in a team" in refused.text, refused.text
    assert (await api.client.get("/v1/agents", headers=headers)).json() == []
    made = {}
    for name in ("User", "olduser"):  # another case is another name, to AgentChat as here
        created = await api.client.post("/v1/agents", json={"name": name, "model": script("hi")}, headers=headers)
        assert created.status_code == 201, created.text
        made[name] = created.json()["id"]
    # an agent named so before the name was refused
    await api.control.agents._repo.update(
        f"{customer_id}.{made['olduser']}", lambda agent: agent.model_copy(update={"name": "user"})
    )
    body = {
        "name": "t",
        "members": [made["User"], made["olduser"]],
        "mode": "swarm",
        "handoffs": {made["User"]: [made["olduser"], "user"]},
        "termination": {"max_messages": 6, "handoff_to_user": True},
    }
    team_refused = await api.client.post("/v1/teams", json=body, headers=headers)
    assert team_refused.status_code == 422, team_refused.text
    assert team_refused.json()["error"]["message"] == (
        f"member {made['olduser']} is named 'user', the human's name in a team: make it anew under another name"
    )
    assert (await api.client.get("/v1/teams", headers=headers)).json() == []
