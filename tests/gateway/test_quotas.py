"""Quotas: admission is atomic under concurrency, reservations come back, and a token budget breach halts the
customer through the killswitch and says why."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import httpx
import nats.js.errors
import pytest

from agent.protocol import EventKind
from control.platform import ControlPlane
from control.services.budget import BUDGET_ACTOR, BudgetHold, BudgetHolds
from control.services.quotas import QuotaRecord, Reservation
from control.settings import Settings
from control.store import Repo
from tests.conftest import Api, serve_api
from tests.gateway.test_agents_api import agent_body, wait_status
from tests.gateway.test_tasks_api import finished, running_agent, running_slow_task, start_task, task_event
from tests.support.helpers import ManualClock, assert_eventually, hold_first_call, now


async def set_quota(api: Api, customer_id: str, **quota: Any) -> dict[str, Any]:
    response = await api.client.put(f"/v1/admin/customers/{customer_id}/quota", json=quota, headers=await api.admin())
    assert response.status_code == 200, response.text
    return dict(response.json())


async def usage(api: Api, headers: dict[str, str]) -> dict[str, Any]:
    return dict((await api.client.get("/v1/usage", headers=headers)).json())


def held(used: dict[str, Any]) -> tuple[int, int]:
    """The CPU and memory a usage report says the customer's running agents hold."""
    return used["cpu"], used["memory_mb"]


async def test_fifty_concurrent_creations_against_a_quota_of_ten_admit_exactly_ten(api: Api) -> None:
    customer_id, headers = await api.new_customer()
    await set_quota(api, customer_id, max_agents=10)
    responses = await asyncio.gather(
        *(api.client.post("/v1/agents", json=agent_body(name=f"a{i}"), headers=headers) for i in range(50))
    )
    codes = sorted(r.status_code for r in responses)
    assert codes.count(201) == 10 and codes.count(409) == 40, codes
    refused = next(r for r in responses if r.status_code == 409).json()["error"]
    assert refused["code"] == "quota_exceeded" and refused["message"] == (
        "quota exceeded: at most 10 agents and the customer has 10: delete one, or ask an operator for a higher "
        "max_agents"
    )
    assert len((await api.client.get("/v1/agents", headers=headers)).json()) == 10
    assert (await usage(api, headers))["agents"] == 10
    # a deleted agent gives its place back
    victim = next(r.json()["id"] for r in responses if r.status_code == 201)
    assert (await api.client.delete(f"/v1/agents/{victim}", headers=headers)).status_code == 204
    assert (await usage(api, headers))["agents"] == 9
    again = await api.client.post("/v1/agents", json=agent_body(name="again"), headers=headers)
    assert again.status_code == 201


async def test_cpu_and_memory_are_reserved_while_running_and_released_on_stop(api: Api) -> None:
    customer_id, headers = await api.new_customer()
    await set_quota(api, customer_id, max_memory_mb=600, max_cpu=1000)
    first = await api.client.post(
        "/v1/agents", json=agent_body(name="big", resources={"cpu": 300, "memory_mb": 512}), headers=headers
    )
    assert first.status_code == 201
    second = await api.client.post(
        "/v1/agents", json=agent_body(name="other", resources={"cpu": 300, "memory_mb": 256}), headers=headers
    )
    assert second.status_code == 409 and "memory" in second.json()["error"]["message"]
    assert (await usage(api, headers))["memory_mb"] == 512
    await api.client.post(f"/v1/agents/{first.json()['id']}/stop", headers=headers)
    assert (await usage(api, headers))["memory_mb"] == 0
    third = await api.client.post("/v1/agents", json=agent_body(name="other"), headers=headers)
    assert third.status_code == 201
    # starting the big one again would go over now, and so would growing the running one
    restart = await api.client.post(f"/v1/agents/{first.json()['id']}/start", headers=headers)
    assert restart.status_code == 409
    grow = await api.client.patch(
        f"/v1/agents/{third.json()['id']}", json={"resources": {"cpu": 200, "memory_mb": 4096}}, headers=headers
    )
    assert grow.status_code == 409 and "memory" in grow.json()["error"]["message"]
    unchanged = (await api.client.get(f"/v1/agents/{third.json()['id']}", headers=headers)).json()
    assert unchanged["resources"]["memory_mb"] == 256 and unchanged["version"] == 1


async def test_concurrent_tasks_are_limited_and_released_when_they_end(api: Api) -> None:
    customer_id, headers = await api.new_customer()
    await set_quota(api, customer_id, max_concurrent_tasks=1)
    slow = {"provider": "replay", "name": "slow", "responses": ["done"], "delay_ms": 60_000}
    agent = await running_agent(api, headers, model=slow, tools=[])
    first = await start_task(api, headers, agent["id"])
    refused = await api.client.post("/v1/tasks", json={"agent_id": agent["id"], "task": "more"}, headers=headers)
    assert refused.status_code == 409, refused.text
    assert refused.json()["error"]["message"] == (
        "quota exceeded: at most 1 concurrent task and 1 is in flight: wait for one to end, or cancel one"
    )
    await api.client.post(f"/v1/tasks/{first}/cancel", headers=headers)
    await finished(api, headers, first)
    await assert_eventually(lambda: usage(api, headers), lambda u: u["concurrent_tasks"] == 0)
    assert (
        await api.client.post("/v1/tasks", json={"agent_id": agent["id"], "task": "x"}, headers=headers)
    ).status_code == 202


async def test_a_token_budget_breach_engages_the_customers_killswitch_and_is_audited(api: Api) -> None:
    customer_id, headers = await api.new_customer()
    _, bystander = await api.new_customer("bystander")
    await set_quota(api, customer_id, tokens_per_day=10)
    agent = await running_agent(api, headers)
    other = await running_agent(api, bystander)
    task = await finished(api, headers, await start_task(api, headers, agent["id"]))
    assert task["usage"]["completion_tokens"] + task["usage"]["prompt_tokens"] > 10
    halted = await wait_status(api, headers, agent["id"], "killed")
    assert "daily token budget of 10 tokens exceeded" in halted["status_reason"]
    refused = await api.client.post("/v1/tasks", json={"agent_id": agent["id"], "task": "x"}, headers=headers)
    assert refused.status_code == 409 and "token budget" in refused.json()["error"]["message"]
    assert (await usage(api, headers))["tokens_today"] > 10
    assert (await api.client.get(f"/v1/agents/{other['id']}", headers=bystander)).json()["status"] == "running"
    audit = (
        await api.client.get("/v1/admin/audit", params={"actor": "system:token-budget"}, headers=await api.admin())
    ).json()
    assert [(r["action"], r["customer_id"]) for r in audit] == [("killswitch.engage", customer_id)]


async def test_a_metering_write_whose_answer_was_lost_counts_once_and_still_halts_the_customer(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The write that crosses the budget is made, and its answer times out: tried again, it adds nothing, and the
    customer is halted all the same, as the lost answer would have had it."""
    customer_id, headers, task_id = await running_slow_task(api)
    await set_quota(api, customer_id, tokens_per_day=5)
    quotas, calls = api.control.tasks._quotas, []
    record_tokens = quotas.record_tokens

    async def answer_lost_once(*args: Any) -> Any:
        calls.append(await record_tokens(*args))
        if len(calls) == 1:
            raise nats.errors.TimeoutError
        return calls[-1]

    monkeypatch.setattr(quotas, "record_tokens", answer_lost_once)
    usage_event = task_event(customer_id, task_id, EventKind.USAGE, prompt_tokens=4, completion_tokens=2)
    await api.control.tasks.publish(usage_event)
    await assert_eventually(lambda: halts_of(api, customer_id), lambda halts: len(halts) == 1, what="the halt")
    assert "daily token budget of 5 tokens exceeded (6 used today)" in (await halts_of(api, customer_id))[0]["reason"]
    assert calls == [(6, 5, True), (6, 5, True)]  # the second wrote nothing, and said what the first did
    assert (await usage(api, headers))["tokens_today"] == 6


BEFORE_MIDNIGHT = datetime(2030, 1, 1, 22, 0, tzinfo=UTC)
MIDNIGHT = datetime(2030, 1, 2, tzinfo=UTC)


@contextlib.asynccontextmanager
async def api_at(settings: Settings, clock: ManualClock) -> AsyncIterator[Api]:
    """The gateway over a control plane whose budget days end by ``clock``."""
    async with ControlPlane(settings, clock=clock) as control, serve_api(control) as api:
        yield api


async def over_budget(api: Api) -> tuple[str, dict[str, str], dict[str, Any]]:
    """A customer whose first task went over their budget of 10 tokens a day, and their agent, halted."""
    customer_id, headers = await api.new_customer()
    await set_quota(api, customer_id, tokens_per_day=10)
    agent = await running_agent(api, headers)
    await finished(api, headers, await start_task(api, headers, agent["id"]))
    halted = await wait_status(api, headers, agent["id"], "killed")
    holds = Repo(api.control.jet.kv["system"], BudgetHold)
    await assert_eventually(lambda: holds.get(f"budget_hold.{customer_id}"), lambda hold: hold is not None)
    return customer_id, headers, halted


async def halts_of(api: Api, customer_id: str) -> list[dict[str, Any]]:
    flags = (await api.client.get("/v1/admin/killswitch", headers=await api.admin())).json()
    return [f for f in flags if f["scope"] == "customer" and f["target"] == customer_id]


async def test_a_token_budgets_halt_says_when_it_lifts_and_lifts_when_the_day_ends(settings: Settings) -> None:
    clock = ManualClock(BEFORE_MIDNIGHT)
    async with api_at(settings, clock) as api:
        customer_id, headers, agent = await over_budget(api)
        assert "lifts at 2030-01-02 00:00 UTC" in agent["status_reason"]
        await clock.set(MIDNIGHT)
        await assert_eventually(lambda: halts_of(api, customer_id), lambda halts: halts == [], what="released")
        await wait_status(api, headers, agent["id"], "running")
        await set_quota(api, customer_id, tokens_per_day=10_000)  # the quota's own check counts the real day
        assert (
            await api.client.post("/v1/tasks", json={"agent_id": agent["id"], "task": "x"}, headers=headers)
        ).status_code == 202
        audit = (
            await api.client.get("/v1/admin/audit", params={"actor": BUDGET_ACTOR}, headers=await api.admin())
        ).json()
        assert [r["action"] for r in audit] == ["killswitch.engage", "killswitch.release"]


async def test_a_token_budgets_halt_lifts_after_a_restart_and_never_an_operators(settings: Settings) -> None:
    async with api_at(settings, ManualClock(BEFORE_MIDNIGHT)) as api:
        customer_id, _, _ = await over_budget(api)
        other_id, _, _ = await over_budget(api)
        operator = {"scope": "customer", "customer_id": other_id, "reason": "unpaid invoice", "wait_ms": 0}
        response = await api.client.post("/v1/admin/killswitch", json=operator, headers=await api.admin())
        assert response.status_code == 200, response.text
    async with api_at(settings, ManualClock(MIDNIGHT)) as api:  # started again once the day is over
        await assert_eventually(lambda: halts_of(api, customer_id), lambda halts: halts == [], what="released")
        holds = Repo(api.control.jet.kv["system"], BudgetHold)
        await assert_eventually(lambda: holds.list("budget_hold.*"), lambda kept: kept == [], what="holds done")
        (halt,) = await halts_of(api, other_id)
        assert halt["reason"] == "unpaid invoice"


async def test_a_quota_change_that_leaves_tokens_today_lifts_the_budgets_halt_at_once(settings: Settings) -> None:
    """An operator raises the budget of a customer it halted (or removes it): they work again now, not at
    midnight, and going over the new budget halts them again."""
    async with api_at(settings, ManualClock(BEFORE_MIDNIGHT)) as api:
        customer_id, headers, agent = await over_budget(api)
        used = (await set_quota(api, customer_id, tokens_per_day=100_000))["tokens_today"]
        assert await halts_of(api, customer_id) == []
        await wait_status(api, headers, agent["id"], "running")
        task = await finished(api, headers, await start_task(api, headers, agent["id"]))
        assert task["status"] == "completed", task
        metered = await assert_eventually(lambda: usage(api, headers), lambda u: u["concurrent_tasks"] == 0)
        await set_quota(api, customer_id, tokens_per_day=metered["tokens_today"] + 1)
        await finished(api, headers, await start_task(api, headers, agent["id"]))
        halted = await wait_status(api, headers, agent["id"], "killed")  # over the new budget: halted again
        assert f"daily token budget of {metered['tokens_today'] + 1} tokens exceeded" in halted["status_reason"]
        await set_quota(api, customer_id)  # no budget
        assert await halts_of(api, customer_id) == []
        await wait_status(api, headers, agent["id"], "running")
        audit = (
            await api.client.get("/v1/admin/audit", params={"actor": BUDGET_ACTOR}, headers=await api.admin())
        ).json()
        assert [(r["action"], r["details"]["reason"].split(" (")[0]) for r in audit] == [
            ("killswitch.engage", "daily token budget of 10 tokens exceeded"),
            ("killswitch.release", "daily token budget set to 100000 tokens"),
            ("killswitch.engage", f"daily token budget of {metered['tokens_today'] + 1} tokens exceeded"),
            ("killswitch.release", "no daily token budget"),
        ]
        assert f"({used} used today)" in audit[1]["details"]["reason"]


async def test_a_quota_change_never_lifts_an_operators_halt(settings: Settings) -> None:
    async with api_at(settings, ManualClock(BEFORE_MIDNIGHT)) as api:
        customer_id, _, _ = await over_budget(api)
        operator = {**UNPAID, "customer_id": customer_id}
        assert (
            await api.client.post("/v1/admin/killswitch", json=operator, headers=await api.admin())
        ).status_code == 200
        await set_quota(api, customer_id, tokens_per_day=100_000)
        await set_quota(api, customer_id)
        (halt,) = await halts_of(api, customer_id)
        assert halt["reason"] == "unpaid invoice" and halt["by"] != BUDGET_ACTOR


@pytest.mark.parametrize("engaging_replica", ["runs on", "is gone"])
async def test_every_control_plane_times_a_budgets_halt_and_one_lifts_it(
    settings: Settings, engaging_replica: str
) -> None:
    clock = ManualClock(BEFORE_MIDNIGHT)
    async with api_at(settings, clock) as api:
        control = api.control
        other = BudgetHolds(Repo(control.jet.kv["system"], BudgetHold), control.killswitch, clock, look_again_s=0.05)
        await other.start()  # another replica, started before the halt: it learns of it by looking again
        try:
            customer_id, _, _ = await over_budget(api)
            if engaging_replica == "is gone":
                await control._budget.stop()  # type: ignore[union-attr]
            await assert_eventually(now(lambda: customer_id in other._timers), lambda timed: timed, what="taken up")
            await clock.set(MIDNIGHT)
            await assert_eventually(lambda: halts_of(api, customer_id), lambda halts: halts == [], what="released")
            holds = Repo(control.jet.kv["system"], BudgetHold)
            await assert_eventually(lambda: holds.list("budget_hold.*"), lambda kept: kept == [], what="holds done")
            params = {"actor": BUDGET_ACTOR, "action": "killswitch.release"}
            audit = (await api.client.get("/v1/admin/audit", params=params, headers=await api.admin())).json()
            assert len(audit) == 1, audit  # released once, by one of them
        finally:
            await other.stop()


async def test_an_operators_halt_is_not_taken_over_by_the_budget(api: Api) -> None:
    customer_id, _ = await api.new_customer()
    operator = {"scope": "customer", "customer_id": customer_id, "reason": "unpaid invoice", "wait_ms": 0}
    assert (await api.client.post("/v1/admin/killswitch", json=operator, headers=await api.admin())).status_code == 200
    holds = BudgetHolds(
        Repo(api.control.jet.kv["system"], BudgetHold), api.control.killswitch, ManualClock(BEFORE_MIDNIGHT)
    )
    await holds.engage(customer_id, 11, 10)  # tokens metered after the operator's halt, from a call in flight
    await holds.stop()
    (halt,) = await halts_of(api, customer_id)
    assert halt["reason"] == "unpaid invoice" and halt["by"] != BUDGET_ACTOR
    assert await Repo(api.control.jet.kv["system"], BudgetHold).list("budget_hold.*") == []


async def test_a_budget_halt_whose_hold_was_lost_is_kept_again_and_not_engaged_twice(api: Api) -> None:
    """The budget engaged its halt, and its control plane stopped before it kept the hold (when it lifts): the
    next breach keeps the hold of the halt in force rather than engaging another one over it."""
    customer_id, _ = await api.new_customer()
    repo = Repo(api.control.jet.kv["system"], BudgetHold)
    holds = BudgetHolds(repo, api.control.killswitch, ManualClock(datetime.now(UTC)))
    await holds.engage(customer_id, 11, 10)
    (halt,) = await halts_of(api, customer_id)
    await repo.delete(f"budget_hold.{customer_id}")
    await holds.engage(customer_id, 12, 10)
    await holds.stop()
    (again,) = await halts_of(api, customer_id)
    assert again["id"] == halt["id"] and again["by"] == BUDGET_ACTOR
    kept = await repo.get(f"budget_hold.{customer_id}")
    assert kept is not None and kept.flag_id == halt["id"]
    params = {"actor": BUDGET_ACTOR, "action": "killswitch.engage", "customer_id": customer_id}
    audit = (await api.client.get("/v1/admin/audit", params=params, headers=await api.admin())).json()
    assert len(audit) == 1, audit


UNPAID = {"scope": "customer", "reason": "unpaid invoice", "wait_ms": 0}


async def test_an_operators_halt_engaged_as_the_budget_engages_stays_the_operators(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The budget looked, found no halt, and is about to write its own when an operator engages theirs: the
    budget's is not written over it (it would have been lifted at midnight)."""
    customer_id, _ = await api.new_customer()
    killswitch = api.control.killswitch
    holds = BudgetHolds(Repo(api.control.jet.kv["system"], BudgetHold), killswitch, ManualClock(BEFORE_MIDNIGHT))
    about_to_write = hold_first_call(monkeypatch, (killswitch, "_switch"), (killswitch, "apply"))
    engaging = asyncio.create_task(holds.engage(customer_id, 11, 10))
    await about_to_write.wait()
    operator = {**UNPAID, "customer_id": customer_id}
    assert (await api.client.post("/v1/admin/killswitch", json=operator, headers=await api.admin())).status_code == 200
    await engaging
    await holds.stop()
    (halt,) = await halts_of(api, customer_id)
    assert halt["reason"] == "unpaid invoice" and halt["by"] != BUDGET_ACTOR
    assert await Repo(api.control.jet.kv["system"], BudgetHold).list("budget_hold.*") == []


async def test_an_operators_halt_engaged_as_the_budgets_lifts_stays(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Midnight: the budget found its own halt and is about to remove it when an operator engages theirs in
    its place: the operator's stays, and the budget forgets its hold."""
    clock = ManualClock(BEFORE_MIDNIGHT)
    async with api_at(settings, clock) as api:
        customer_id, _, _ = await over_budget(api)
        killswitch = api.control.killswitch
        about_to_remove = hold_first_call(monkeypatch, (killswitch, "_switch"), (killswitch, "apply"))
        await clock.set(MIDNIGHT)
        await about_to_remove.wait()
        operator = {**UNPAID, "customer_id": customer_id}
        response = await api.client.post("/v1/admin/killswitch", json=operator, headers=await api.admin())
        assert response.status_code == 200, response.text
        holds = Repo(api.control.jet.kv["system"], BudgetHold)
        await assert_eventually(lambda: holds.list("budget_hold.*"), lambda kept: kept == [], what="hold forgotten")
        (halt,) = await halts_of(api, customer_id)
        assert halt["reason"] == "unpaid invoice" and halt["by"] != BUDGET_ACTOR


async def test_reading_usage_writes_nothing_and_the_first_reservation_starts_from_the_default(api: Api) -> None:
    customer_id, headers = await api.new_customer()  # logging in reads the customer's tier
    quotas = api.control.jet.kv["quotas"]
    for read in (usage(api, headers), api.client.get("/v1/admin/stats", headers=await api.admin())):
        await read
    with pytest.raises(nats.js.errors.KeyNotFoundError):
        await quotas.get(customer_id)
    assert (await usage(api, headers))["quota"]["max_agents"] == api.control.settings.max_agents_per_customer
    assert (await api.client.post("/v1/agents", json=agent_body(name="first"), headers=headers)).status_code == 201
    stored = QuotaRecord.model_validate_json((await quotas.get(customer_id)).value or b"")
    assert stored.quota.max_agents == api.control.settings.max_agents_per_customer and len(stored.agents) == 1


async def test_a_quota_field_left_out_takes_a_new_customers_default_and_null_is_unlimited(api: Api) -> None:
    """Setting a token budget does not lift the agent cap every customer starts with; `{}` resets the quota."""
    customer_id, headers = await api.new_customer()
    default = api.control.settings.max_agents_per_customer
    assert (await set_quota(api, customer_id, tokens_per_day=10))["quota"]["max_agents"] == default
    await set_quota(api, customer_id, max_agents=3, max_cpu=1000, tier="free")
    reset = await set_quota(api, customer_id)
    unlimited = dict.fromkeys(("max_cpu", "max_memory_mb", "max_concurrent_tasks", "tokens_per_day"))
    assert reset["quota"] == {"tier": "standard", "max_agents": default, **unlimited}
    assert (await set_quota(api, customer_id, max_agents=None))["quota"]["max_agents"] is None
    assert (await usage(api, headers))["quota"] == {"tier": "standard", "max_agents": None, **unlimited}


async def test_bad_quotas_are_422(api: Api) -> None:
    customer_id, _ = await api.new_customer()
    admin = await api.admin()
    before = await set_quota(api, customer_id, max_agents=5, tokens_per_day=100)
    numbers = ("max_agents", "max_cpu", "max_memory_mb", "max_concurrent_tasks", "tokens_per_day")
    not_numbers = [{field: value} for field in numbers for value in ("3", True)]  # not taken as 3 or 1
    for body in ({"max_agents": -1}, {"tier": "platinum"}, {"unknown": 1}, {"tokens_per_day": "lots"}, *not_numbers):
        response = await api.client.put(f"/v1/admin/customers/{customer_id}/quota", json=body, headers=admin)
        assert response.status_code == 422, body
    assert (await api.client.get(f"/v1/admin/customers/{customer_id}", headers=admin)).json()["usage"] == before
    assert (
        await api.client.put("/v1/admin/customers/cu-000000000000/quota", json={}, headers=admin)
    ).status_code == 404


async def change_quota(api: Api, customer_id: str, body: dict[str, Any]) -> httpx.Response:
    return await api.client.patch(f"/v1/admin/customers/{customer_id}/quota", json=body, headers=await api.admin())


async def test_a_quota_patch_changes_the_fields_it_gives_and_keeps_the_others(api: Api) -> None:
    customer_id, headers = await api.new_customer()
    await set_quota(api, customer_id, max_agents=5, max_cpu=1000, tokens_per_day=100, tier="free")
    changed = await change_quota(api, customer_id, {"max_cpu": 2000, "tokens_per_day": None})
    assert changed.status_code == 200, changed.text
    expected = {
        "tier": "free",
        "max_agents": 5,
        "max_cpu": 2000,
        "max_memory_mb": None,
        "max_concurrent_tasks": None,
        "tokens_per_day": None,  # null: unlimited, not "left as it was"
    }
    assert changed.json()["quota"] == expected
    assert (await usage(api, headers))["quota"] == expected
    (record,) = (
        await api.client.get("/v1/admin/audit", params={"action": "quota.change"}, headers=await api.admin())
    ).json()
    assert record["target"] == record["customer_id"] == customer_id and record["result"] == "ok"
    assert record["details"] == {"changes": {"max_cpu": 2000, "tokens_per_day": None}, "quota": expected}
    # and the schema a client is generated from does not offer defaults a left-out field would take
    schema = (await api.client.get("/openapi.json")).json()
    patch = schema["paths"]["/v1/admin/customers/{customer_id}/quota"]["patch"]
    body = patch["requestBody"]["content"]["application/json"]["schema"]
    fields = schema["components"]["schemas"][body["$ref"].rsplit("/", 1)[1]]["properties"]
    assert set(fields) == set(expected) and not [name for name, field in fields.items() if "default" in field]


async def test_a_customer_without_a_quota_record_changes_the_default(api: Api) -> None:
    customer_id, headers = await api.new_customer()
    changed = (await change_quota(api, customer_id, {"max_concurrent_tasks": 2})).json()["quota"]
    assert changed["max_agents"] == api.control.settings.max_agents_per_customer  # the default, kept
    assert changed["max_concurrent_tasks"] == 2 and (await usage(api, headers))["quota"] == changed


async def test_quota_patches_of_different_fields_made_at_once_all_hold(api: Api) -> None:
    """Each PATCH changes its field in the same compare-and-set that reads the others: none writes back a value
    it read before another one's change."""
    customer_id, headers = await api.new_customer()
    bodies = [{"max_cpu": 1000 + i} for i in range(10)] + [{"max_memory_mb": 2000}, {"tokens_per_day": 3000}]
    bodies += [{"max_concurrent_tasks": 4}, {"tier": "enterprise"}, {"max_agents": 7}]
    answers = await asyncio.gather(*(change_quota(api, customer_id, body) for body in bodies))
    assert [a.status_code for a in answers] == [200] * len(bodies)
    quota = (await usage(api, headers))["quota"]
    assert 1000 <= quota.pop("max_cpu") <= 1009
    assert quota == {
        "tier": "enterprise",
        "max_agents": 7,
        "max_memory_mb": 2000,
        "max_concurrent_tasks": 4,
        "tokens_per_day": 3000,
    }


async def test_bad_quota_patches_are_refused_and_change_nothing(api: Api) -> None:
    customer_id, _ = await api.new_customer()
    admin = await api.admin()
    before = await set_quota(api, customer_id, max_agents=5, tokens_per_day=100)
    empty = await change_quota(api, customer_id, {})
    assert empty.status_code == 422 and "nothing to change" in empty.json()["error"]["message"]
    for body in ({"max_agents": -1}, {"tier": "platinum"}, {"unknown": 1}, {"max_cpu": "3"}, {"max_cpu": True}):
        assert (await change_quota(api, customer_id, body)).status_code == 422, body
    assert (await api.client.get(f"/v1/admin/customers/{customer_id}", headers=admin)).json()["usage"] == before
    missing = await change_quota(api, "cu-000000000000", {"max_agents": 1})
    assert missing.status_code == 404
    records = (await api.client.get("/v1/admin/audit", params={"action": "quota.change"}, headers=admin)).json()
    assert [(r["customer_id"], r["result"]) for r in records] == [("cu-000000000000", "failed")]
    _, customer = await api.new_customer()
    assert (
        await api.client.patch(f"/v1/admin/customers/{customer_id}/quota", json={"max_agents": 50}, headers=customer)
    ).status_code == 403


async def test_a_quota_patch_that_leaves_tokens_today_lifts_the_budgets_halt(settings: Settings) -> None:
    async with api_at(settings, ManualClock(BEFORE_MIDNIGHT)) as api:
        customer_id, headers, agent = await over_budget(api)
        assert (await change_quota(api, customer_id, {"tokens_per_day": 100_000})).status_code == 200
        assert await halts_of(api, customer_id) == []
        await wait_status(api, headers, agent["id"], "running")


async def test_cpu_and_memory_are_reserved_for_every_replica(api: Api) -> None:
    customer_id, headers = await api.new_customer()
    await set_quota(api, customer_id, max_cpu=1000, max_memory_mb=1024)
    # one replica fits the quota; ten of them are 9000 MHz
    body = agent_body(name="wide", resources={"cpu": 900, "memory_mb": 128}, replicas=10)
    refused = await api.client.post("/v1/agents", json=body, headers=headers)
    assert refused.status_code == 409, refused.text
    error = refused.json()["error"]
    assert error["code"] == "quota_exceeded" and "9000 MHz (10 replicas of 900 MHz)" in error["message"]
    assert (await usage(api, headers))["agents"] == 0
    assert (await api.client.get("/v1/agents", headers=headers)).json() == []

    created = await api.client.post(
        "/v1/agents", json=agent_body(resources={"cpu": 200, "memory_mb": 128}, replicas=2), headers=headers
    )
    assert created.status_code == 201, created.text
    agent = created.json()
    assert held(await usage(api, headers)) == (400, 256)

    # a change the quota refuses changes nothing: neither the definition, nor the job, nor the reservation
    for change in ({"replicas": 6}, {"resources": {"cpu": 600, "memory_mb": 128}}):
        grow = await api.client.patch(f"/v1/agents/{agent['id']}", json=change, headers=headers)
        assert grow.status_code == 409, grow.text
        assert grow.json()["error"]["code"] == "quota_exceeded" and "1200 MHz" in grow.json()["error"]["message"]
        unchanged = (await api.client.get(f"/v1/agents/{agent['id']}", headers=headers)).json()
        assert (unchanged["version"], unchanged["replicas"], unchanged["resources"]["cpu"]) == (1, 2, 200)
        job = (await api.client.get(f"/v1/agents/{agent['id']}/job", headers=headers)).json()["Job"]
        assert job["TaskGroups"][0]["Count"] == 2
        assert held(await usage(api, headers)) == (400, 256)

    change = {"replicas": 3, "resources": {"cpu": 300, "memory_mb": 256}}
    grown = await api.client.patch(f"/v1/agents/{agent['id']}", json=change, headers=headers)
    assert grown.status_code == 200, grown.text
    assert held(await usage(api, headers)) == (900, 768)
    assert (await api.client.post(f"/v1/agents/{agent['id']}/stop", headers=headers)).status_code == 200
    assert held(await usage(api, headers)) == (0, 0)
    # changed while stopped, it holds its new size when it starts again
    shrunk = await api.client.patch(f"/v1/agents/{agent['id']}", json={"replicas": 1}, headers=headers)
    assert shrunk.status_code == 200 and held(await usage(api, headers)) == (0, 0)
    assert (await api.client.post(f"/v1/agents/{agent['id']}/start", headers=headers)).status_code == 200
    assert held(await usage(api, headers)) == (300, 256)


async def test_a_change_that_grows_nothing_is_admitted_under_a_quota_lowered_below_what_is_held(api: Api) -> None:
    """An admin lowers a customer's quota below what their running agents hold: the customer shrinks an agent to
    come back under it. That PATCH was refused (409, "this agent needs 200 MHz and the others hold 300 MHz"), as
    if it asked for more: only what a change grows is checked against the quota."""
    customer_id, headers = await api.new_customer()
    await set_quota(api, customer_id, max_cpu=1000, max_memory_mb=1000)
    wide = await api.client.post(
        "/v1/agents",
        json=agent_body(name="wide", resources={"cpu": 200, "memory_mb": 128}, replicas=2),
        headers=headers,
    )
    other = await api.client.post(
        "/v1/agents", json=agent_body(name="other", resources={"cpu": 300, "memory_mb": 128}), headers=headers
    )
    assert (wide.status_code, other.status_code) == (201, 201), (wide.text, other.text)
    assert held(await usage(api, headers)) == (700, 384)
    await set_quota(api, customer_id, max_cpu=350, max_memory_mb=1000)
    path = f"/v1/agents/{wide.json()['id']}"

    shrunk = await api.client.patch(path, json={"replicas": 1}, headers=headers)
    assert shrunk.status_code == 200, shrunk.text
    assert held(await usage(api, headers)) == (500, 256)
    changed = await api.client.patch(path, json={"resources": {"cpu": 100, "memory_mb": 512}}, headers=headers)
    assert changed.status_code == 200, changed.text  # less CPU, more memory: only the memory is checked, and fits
    assert held(await usage(api, headers)) == (400, 640)
    # what grows is checked as ever
    refused = await api.client.patch(path, json={"resources": {"cpu": 200}}, headers=headers)
    assert refused.status_code == 409 and "at most 350 MHz" in refused.json()["error"]["message"], refused.text
    assert held(await usage(api, headers)) == (400, 640)


async def test_reservations_stored_for_one_replica_are_corrected_when_the_control_plane_starts(api: Api) -> None:
    customer_id, headers = await api.new_customer()
    created = await api.client.post(
        "/v1/agents", json=agent_body(resources={"cpu": 100, "memory_mb": 128}, replicas=3), headers=headers
    )
    assert created.status_code == 201, created.text
    quotas = Repo(api.control.jet.kv["quotas"], QuotaRecord)

    def one_replica(record: QuotaRecord) -> QuotaRecord:  # as versions before replicas counted wrote it
        return record.model_copy(update={"running": {a: Reservation(cpu=100, memory_mb=128) for a in record.running}})

    await quotas.update(customer_id, one_replica)
    assert (await usage(api, headers))["cpu"] == 100
    await api.control.agents.reconcile()
    assert held(await usage(api, headers)) == (300, 384)

    def newer(record: QuotaRecord) -> QuotaRecord:  # as a PATCH on another replica reserved it since
        return record.model_copy(update={"running": {a: Reservation(cpu=600, memory_mb=768) for a in record.running}})

    await quotas.update(customer_id, newer)
    await api.control.agents.reconcile()  # from records read before that PATCH stored its own
    assert held(await usage(api, headers)) == (600, 768)


async def test_a_patch_racing_a_start_never_runs_what_the_quota_does_not_hold(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    customer_id, headers = await api.new_customer()
    await set_quota(api, customer_id, max_cpu=1000)
    body = agent_body(resources={"cpu": 100, "memory_mb": 128})
    agent = (await api.client.post("/v1/agents", json=body, headers=headers)).json()
    await api.client.post(f"/v1/agents/{agent['id']}/stop", headers=headers)
    submitted: list[dict[str, Any]] = []
    submit = api.control.scheduler.submit

    async def recorded(job: dict[str, Any], *args: Any) -> Any:
        submitted.append(job)
        return await submit(job, *args)

    monkeypatch.setattr(api.control.scheduler, "submit", recorded)
    # the start has read the stopped agent and waits before its quota check until the PATCH has read it too
    start_waits = hold_first_call(
        monkeypatch, (api.control.quotas, "reserve_running"), until=(api.control.agents, "get")
    )
    start = asyncio.create_task(api.client.post(f"/v1/agents/{agent['id']}/start", headers=headers))
    await start_waits.wait()
    patch = await api.client.patch(
        f"/v1/agents/{agent['id']}", json={"resources": {"cpu": 5000, "memory_mb": 128}}, headers=headers
    )
    assert (await start).status_code == 200, start.result().text
    assert patch.status_code == 409 and "5000 MHz" in patch.json()["error"]["message"], patch.text
    after = (await api.client.get(f"/v1/agents/{agent['id']}", headers=headers)).json()
    job = submitted[-1]["TaskGroups"][0]
    runs = job["Tasks"][0]["Resources"]["CPU"] * job["Count"]
    assert (after["desired"], after["resources"]["cpu"]) == ("running", 100)
    assert held(await usage(api, headers))[0] == runs == 100
