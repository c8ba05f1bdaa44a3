"""A team task whose member is stopped, or halted by the killswitch, before or during its run: it ends at once,
naming the member and why, rather than waiting for heartbeats and joins to time out; while a member is only
starting, the task says it waits for it."""

from __future__ import annotations

import time
from typing import Any

import pytest

from control.teams.runner import JOIN_ASKED_S
from tests.conftest import Api
from tests.gateway.teams_support import agent_ready, agents, health, script, start, task_status, team
from tests.support.helpers import assert_eventually, stalled

SLOW = script("zz", delay_ms=600_000)
PROMPTLY_S = 4.0
"""Under what the run waited before: a member's silence (5 s), then its join (30 s)."""


async def busy_team(api: Api) -> tuple[str, dict[str, str], dict[str, dict[str, Any]], str]:
    """A customer's team of `fast` and `slow`, with a task on it whose run waits on slow's model call."""
    customer_id, headers = await api.new_customer()
    made = await agents(api, headers, {"fast": {"model": script("f1", "f2")}, "slow": {"model": SLOW}})
    created = await team(
        api, headers, members=[made["fast"]["id"], made["slow"]["id"]], termination={"max_messages": 4}
    )
    port = (await agent_ready(api, customer_id, made["slow"]["id"]))["data"]["health_port"]
    task_id = await start(api, headers, created["id"], "Go.")
    await assert_eventually(lambda: health(port), lambda h: h["team_handlers"] >= 1, what="slow's model call")
    return customer_id, headers, made, task_id


async def idle_after(api: Api, customer_id: str, agent_id: str) -> None:
    """The member left standing dropped its part of the run."""
    port = (await agent_ready(api, customer_id, agent_id))["data"]["health_port"]
    await assert_eventually(lambda: health(port), lambda h: h["team_runs"] == 0, what="member idle")


async def no_tasks_in_flight(api: Api, headers: dict[str, str]) -> None:
    await assert_eventually(
        lambda: api.client.get("/v1/usage", headers=headers),
        lambda r: r.json()["concurrent_tasks"] == 0,
        what="the task's quota slot back",
    )


@pytest.mark.parametrize("stopped", ["slow", "fast"], ids=["the-speaker", "a-listener"])
async def test_a_member_stopped_mid_run_fails_the_team_task_at_once_naming_it(api: Api, stopped: str) -> None:
    customer_id, headers, made, task_id = await busy_team(api)
    member = made[stopped]["id"]
    began = time.monotonic()
    assert (await api.client.post(f"/v1/agents/{member}/stop", headers=headers)).status_code == 200
    ended = await task_status(api, headers, task_id, within=PROMPTLY_S)
    assert ended["status"] == "failed", ended
    assert ended["status_reason"] == f"a member of its team: agent {member} ({stopped}) was stopped", ended
    assert ended["attempt"] == 1  # not broken off and started again, only to wait for the member to join
    assert time.monotonic() - began < PROMPTLY_S
    await idle_after(api, customer_id, made["fast" if stopped == "slow" else "slow"]["id"])
    await no_tasks_in_flight(api, headers)


@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
async def test_a_killswitch_on_a_member_kills_the_team_task_with_its_reason(api: Api, hard: bool) -> None:
    """As a single agent's task under the killswitch: `killed`, with the flag's reason (and the member named)."""
    customer_id, headers, made, task_id = await busy_team(api)
    member = made["slow"]["id"]
    body = {"scope": "agent", "agent_id": member, "reason": "runaway costs", "hard": hard}
    response = await api.client.post("/v1/admin/killswitch", json=body, headers=await api.admin())
    assert response.status_code == 200, response.text
    ended = await task_status(api, headers, task_id, within=PROMPTLY_S)
    assert ended["status"] == "killed", ended
    reason = f"a member of its team: agent {member} (slow) was halted by the killswitch: runaway costs"
    assert ended["status_reason"] == reason, ended
    await idle_after(api, customer_id, made["fast"]["id"])
    await no_tasks_in_flight(api, headers)


async def test_a_team_task_waits_for_a_starting_member_saying_so_and_fails_at_once_when_it_is_stopped(api: Api) -> None:
    _, headers = await api.new_customer()
    members = {}
    for name in ("writer", "critic"):
        response = await api.client.post("/v1/agents", json={"name": name, "model": SLOW}, headers=headers)
        assert response.status_code == 201, response.text
        members[name] = response.json()["id"]
    created = await team(api, headers, members=list(members.values()), termination={"max_messages": 3})
    task_id = await start(api, headers, created["id"], "Go.")
    waiting = await assert_eventually(
        lambda: api.client.get(f"/v1/tasks/{task_id}", headers=headers),
        lambda r: (r.json()["status_reason"] or "").startswith("waiting"),
        within=PROMPTLY_S,
        what="a reason to wait",
    )
    reason = waiting.json()["status_reason"]
    assert reason.startswith("waiting up to 30 s for team member "), reason
    assert any(f"{name} ({agent_id}) to join: it is starting" in reason for name, agent_id in members.items()), reason
    critic = members["critic"]
    assert (await api.client.post(f"/v1/agents/{critic}/stop", headers=headers)).status_code == 200
    ended = await task_status(api, headers, task_id, within=PROMPTLY_S)
    assert ended["status"] == "failed", ended
    assert ended["status_reason"] == f"a member of its team: agent {critic} (critic) was stopped", ended
    await no_tasks_in_flight(api, headers)


async def test_a_team_task_waiting_for_a_member_that_runs_but_does_not_answer_says_so_and_goes_on_when_it_does(
    api: Api,
) -> None:
    """A member whose process runs but does not answer its join (hung, here stopped by SIGSTOP; or its worker not
    up yet) is not said to be only `running`, as if nothing were amiss: the reason says it is not listening."""
    customer_id, headers = await api.new_customer()
    made = await agents(api, headers, {"writer": {"model": script("w1")}, "critic": {"model": script("c1")}})
    critic = made["critic"]["id"]
    pid = (await agent_ready(api, customer_id, critic))["data"]["pid"]
    created = await team(api, headers, members=[made["writer"]["id"], critic], termination={"max_messages": 3})
    with stalled(pid):
        task_id = await start(api, headers, created["id"], "Go.")
        waiting = await assert_eventually(
            lambda: api.client.get(f"/v1/tasks/{task_id}", headers=headers),
            lambda r: (r.json()["status_reason"] or "").startswith("waiting"),
            within=JOIN_ASKED_S + PROMPTLY_S,
            what="a reason to wait",
        )
    reason = waiting.json()["status_reason"]
    assert reason.endswith(f"team member critic ({critic}) to join: it is running but not listening yet"), reason
    ended = await task_status(api, headers, task_id, within=30)
    assert ended["status"] == "completed", ended
    await no_tasks_in_flight(api, headers)
