"""The admin control plane, and tenant isolation across every route."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import Any
from urllib.parse import quote

import httpx
import nats
import pytest
from nats.js.errors import Error as JetStreamError

from control.models import Role
from control.services.audit import AUDIT_STREAM
from gateway.app import create_app
from gateway.ratelimit import Tiers
from tests.conftest import ADMIN_KEY, Api
from tests.gateway.test_agents_api import INVISIBLE_NAMES, READABLE_NAMES, REPLAY, agent_body
from tests.gateway.test_tasks_api import assert_ws_refused, finished, running_agent, start_task
from tests.support.helpers import assert_eventually, named_reads, serve_app

IDS = {"agent_id": "agent", "task_id": "task", "customer_id": "customer", "prefix": "key", "team_id": "team"}


async def test_every_route_refuses_another_tenant_and_changes_nothing(api: Api) -> None:
    alice_id, alice = await api.new_customer("alice")
    _, bob = await api.new_customer("bob")
    agent = await running_agent(api, alice)
    task = await finished(api, alice, await start_task(api, alice, agent["id"]))
    key = (await api.client.get("/v1/admin/keys", params={"customer_id": alice_id}, headers=await api.admin())).json()
    made = await api.client.post(
        "/v1/teams",
        json={"name": "duo", "members": [agent["id"]], "mode": "round_robin", "termination": {"max_messages": 2}},
        headers=alice,
    )
    assert made.status_code == 201, made.text
    ids = {
        "agent": agent["id"],
        "task": task["id"],
        "customer": alice_id,
        "key": key[0]["prefix"],
        "team": made.json()["id"],
    }
    checked = 0
    schema = (await api.client.get("/openapi.json")).json()
    for template, operations in schema["paths"].items():
        if not template.startswith("/v1/"):
            continue
        params = re.findall(r"{(\w+)}", template)
        path = template
        for name in params:
            path = path.replace("{" + name + "}", ids[IDS[name]])
        for method in (m.upper() for m in operations):
            body: dict[str, Any] | None = (
                {"replicas": 2} if method == "PATCH" else {"agent_id": agent["id"], "task": "x"}
            )
            if method in ("GET", "DELETE"):
                body = None
            elif template.endswith("/input"):
                body = {"content": "x"}
            response = await api.client.request(method, path, headers=bob, json=body)
            if path.startswith("/v1/admin/"):
                assert response.status_code == 403, (method, path, response.status_code)
            elif params:
                assert response.status_code == 404, (method, path, response.status_code)
            checked += 1
    assert checked >= 25
    # nothing of Alice's changed
    assert (await api.client.get(f"/v1/agents/{agent['id']}", headers=alice)).json()["version"] == 1
    assert (await api.client.get(f"/v1/tasks/{task['id']}", headers=alice)).json() == task
    assert (await api.client.get("/v1/tasks", headers=bob)).json() == []
    assert (await api.client.get("/v1/teams", headers=bob)).json() == []
    assert (await api.client.get(f"/v1/teams/{ids['team']}", headers=alice)).status_code == 200
    assert (await api.client.post("/v1/auth/token", json={"api_key": "x" * 20})).status_code == 401


async def test_keys_are_shown_once_listed_by_prefix_and_revocable(api: Api) -> None:
    customer_id, _ = await api.new_customer()
    admin = await api.admin()
    created = (await api.client.post(f"/v1/admin/customers/{customer_id}/keys", headers=admin)).json()
    assert created["api_key"].startswith(created["api_key_prefix"])
    token = await api.token(created["api_key"])
    listed = (await api.client.get("/v1/admin/keys", params={"customer_id": customer_id}, headers=admin)).json()
    assert created["api_key_prefix"] in [k["prefix"] for k in listed]
    assert created["api_key"] not in json.dumps(listed)
    assert (await api.client.get("/v1/agents", headers=token)).status_code == 200  # works until revoked
    assert (await api.client.delete(f"/v1/admin/keys/{created['api_key_prefix']}", headers=admin)).status_code == 204
    refused = await api.client.post("/v1/auth/token", json={"api_key": created["api_key"]})
    assert refused.status_code == 401
    await assert_eventually(
        lambda: api.client.get("/v1/agents", headers=token), lambda r: r.status_code == 401, what="old token refused"
    )
    assert (await api.client.delete("/v1/admin/keys/cvn_nothere", headers=admin)).status_code == 404


async def test_a_whole_key_given_for_its_prefix_is_never_recorded_logged_or_answered(
    api: Api, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An operator pastes a key where its prefix goes: the audit log (append-only: kept for good), the log and
    the answers show its prefix at most (a key chosen outside: nothing of it), and the key is not revoked."""
    customer_id, customer = await api.new_customer()
    admin = await api.admin()
    created = (await api.client.post(f"/v1/admin/customers/{customer_id}/keys", headers=admin)).json()
    secret, prefix = created["api_key"], created["api_key_prefix"]
    answers = []
    for key in (secret, ADMIN_KEY):
        refused = await api.client.delete(f"/v1/admin/keys/{key}", headers=admin)
        assert refused.status_code == 404, refused.text
        answers.append(refused.text)
        forbidden = await api.client.delete(f"/v1/admin/keys/{key}", headers=customer)  # refusals are audited too
        assert forbidden.status_code == 403, forbidden.text

    async def broken(prefix: str) -> None:
        raise RuntimeError(f"the revocation of {prefix!r} broke")  # quoting what it was given, in the traceback

    monkeypatch.setattr(api.control.auth, "revoke", broken)
    assert (await api.client.delete(f"/v1/admin/keys/{secret}", headers=admin)).status_code == 500
    assert prefix in answers[0] and "not the key" in answers[0]
    records = await audit(api)
    revocations = [(r["target"], r["result"]) for r in records if r["action"] == "key.revoke"]
    shown = f"{prefix}_<redacted>"
    assert revocations == [(shown, "failed"), ("<redacted>", "failed"), (shown, "failed")]
    forbidden_paths = [r["details"]["path"] for r in records if r["action"] == "auth.forbidden"]
    assert forbidden_paths == [f"/v1/admin/keys/{shown}", "/v1/admin/keys/<redacted>"]
    logged = "\n".join(logging.Formatter().format(r) for r in caplog.records)  # messages and tracebacks
    assert f"DELETE /v1/admin/keys/{shown} " in logged  # the unexpected error, by what it was on
    assert f"RuntimeError: the revocation of '{shown}' broke" in logged
    for text in (*answers, json.dumps(records), logged):
        assert secret.removeprefix(prefix) not in text and ADMIN_KEY[:6] not in text
    await api.token(secret)  # not revoked


async def test_a_key_pasted_into_a_path_a_query_or_a_field_is_recorded_logged_and_answered_by_its_prefix_only(
    api: Api, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A key given anywhere but the token exchange (a path, a query, a header, a field) is kept for good in the
    audit log only by its prefix (a refused request's path, an action's target and error), and neither the log nor
    an answer that repeats the request (a 404 naming the id, a 422 naming the value) repeats it whole."""
    customer_id, customer = await api.new_customer()
    admin = await api.admin()
    created = (await api.client.post(f"/v1/admin/customers/{customer_id}/keys", headers=admin)).json()
    key, prefix = created["api_key"], created["api_key_prefix"]
    shown = f"{prefix}_<redacted>"
    answers: list[str] = []

    async def status(method: str, url: str, headers: dict[str, str] | None = None, **kwargs: Any) -> int:
        response = await api.client.request(method, url, headers=headers, **kwargs)
        answers.append(response.text)
        return response.status_code

    denied = [f"/v1/agents/{key}", f"/v1/agents/{key}/job", f"/v1/teams/{key}", f"/v1/tasks/x.{key}/events"]
    for path in denied:  # no token: refused, and audited with the path
        assert await status("GET", path) == 401, path
    await assert_ws_refused(api.base.replace("http", "ws") + f"/v1/tasks/{key}/ws", 401, "unauthorized")
    assert await status("GET", f"/v1/{key}/agents") == 404  # no such route
    assert await status("POST", f"/v1/admin/agents/{key}/stop", customer) == 403  # audited with the path
    assert await status("GET", f"/v1/agents/{key}", customer) == 404  # the answer names the id
    assert await status("GET", "/v1/tasks", customer, params={"before": key}) == 404
    assert await status("POST", f"/v1/agents/{key}/stop", admin) == 404  # audited: target and error
    assert await status("PUT", f"/v1/admin/customers/{key}/quota", admin, json={"max_agents": 1}) == 404
    assert await status("GET", "/v1/admin/audit", admin, params={"action": key}) == 422  # the value refused
    assert await status("GET", "/v1/admin/audit", admin, params={"since": f"in {key}"}) == 422
    assert await status("GET", "/v1/agents", customer, params={"customer_id": key}) == 403
    assert await status("POST", "/v1/agents", admin, params={"customer_id": key}, json=agent_body()) == 422
    assert await status("POST", "/v1/agents", customer, json=agent_body(replicas=key)) == 422
    assert await status("POST", "/v1/agents", customer, json=agent_body(**{key: 1})) == 422  # a field named so

    async def broken(*args: object) -> None:
        raise RuntimeError(f"the read of {args[-1]} broke")

    monkeypatch.setattr(api.control.agents, "get", broken)
    assert await status("GET", f"/v1/agents/{key}", customer) == 500

    records = await audit(api)
    assert [r["details"]["path"] for r in records if r["action"] == "auth.denied"] == [
        *(path.replace(key, shown) for path in denied),
        f"/v1/tasks/{shown}/ws",
    ]
    assert [r["details"]["path"] for r in records if r["action"] == "auth.forbidden"] == [
        f"/v1/admin/agents/{shown}/stop"
    ]
    assert [(r["target"], r["result"]) for r in records if r["action"] in ("agent.stop", "quota.set")] == [
        (shown, "failed"),
        (shown, "failed"),
    ]
    assert any(f"agent '{shown}' not found" in a for a in answers)  # the 404 still says which
    logged = "\n".join(logging.Formatter().format(r) for r in caplog.records)  # messages and tracebacks
    assert f"GET /v1/agents/{shown} " in logged  # the unexpected error, by what it was on
    assert f"RuntimeError: the read of {shown} broke" in logged
    for text in (*answers, json.dumps(records), logged):
        assert key.removeprefix(prefix) not in text
    await api.token(key)  # the key itself still works


async def admin_prefixes(api: Api) -> list[str]:
    """The prefixes of the admin keys not revoked."""
    keys = (await api.client.get("/v1/admin/keys", headers=await api.admin())).json()
    return [k["prefix"] for k in keys if k["role"] == "admin" and k["revoked_at"] is None]


async def test_the_last_active_admin_key_cannot_be_revoked_and_the_refusal_is_audited(api: Api) -> None:
    """No API makes an admin key: revoking the last one would lock every operator out until a restart."""
    admin = await api.admin()
    (seeded,) = await admin_prefixes(api)
    refused = await api.client.delete(f"/v1/admin/keys/{seeded}", headers=admin)
    assert refused.status_code == 409, refused.text
    error = refused.json()["error"]
    assert error["code"] == "last_admin_key" and "last active admin API key" in error["message"], error
    assert (await api.client.get("/v1/admin/stats", headers=await api.admin())).status_code == 200
    other = await api.control.auth.issue_key(Role.ADMIN, None)  # as a restart with a new CARAVAN_ADMIN_KEY does
    assert (await api.client.delete(f"/v1/admin/keys/{other.prefix}", headers=admin)).status_code == 204
    again = await api.client.delete(f"/v1/admin/keys/{seeded}", headers=admin)
    assert again.status_code == 409 and again.json()["error"]["code"] == "last_admin_key"
    assert await admin_prefixes(api) == [seeded]
    records = await audit(api, action="key.revoke")
    assert [(r["target"], r["result"], r["details"].get("error", {}).get("code")) for r in records] == [
        (seeded, "failed", "last_admin_key"),
        (other.prefix, "ok", None),
        (seeded, "failed", "last_admin_key"),
    ]


async def test_two_revocations_of_the_last_two_admin_keys_at_once_leave_one(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both revocations read the keys (two admin keys active) before either writes: one of them is refused."""
    auth = api.control.auth
    other = await auth.issue_key(Role.ADMIN, None)
    (seeded,) = [p for p in await admin_prefixes(api) if p != other.prefix]
    keys, listed, both_read = auth._keys, auth._keys.list, asyncio.Barrier(2)

    async def read_then_wait(*args: Any) -> Any:
        read = await listed(*args)
        await both_read.wait()
        return read

    monkeypatch.setattr(keys, "list", read_then_wait)
    results = await asyncio.gather(auth.revoke(seeded), auth.revoke(other.prefix), return_exceptions=True)
    monkeypatch.undo()
    assert sorted(type(r).__name__ for r in results) == ["ApiKey", "LastAdminKey"], results
    assert len([k for k in await auth.list_keys() if k.role is Role.ADMIN and k.revoked_at is None]) == 1


async def test_admin_lists_all_agents_force_stops_and_sees_stats(api: Api) -> None:
    _, alice = await api.new_customer("alice")
    _, bob = await api.new_customer("bob")
    a = await running_agent(api, alice)
    b = await running_agent(api, bob)
    await finished(api, alice, await start_task(api, alice, a["id"]))
    admin = await api.admin()
    every = {x["id"] for x in (await api.client.get("/v1/admin/agents", headers=admin)).json()}
    assert {a["id"], b["id"]} <= every
    stats = (await api.client.get("/v1/admin/stats", headers=admin)).json()
    assert stats["agents_by_status"]["running"] >= 2 and stats["tasks_by_status"]["completed"] >= 1
    carol, _ = await api.new_customer("carol")  # no agent, so no quota record: listed, with nothing metered
    assert stats["tokens_today"][a["customer_id"]] > 0 and stats["tokens_today"][b["customer_id"]] == 0
    stats = (await api.client.get("/v1/admin/stats", headers=admin)).json()
    assert stats["tokens_today"][carol] == 0 and stats["customers"] == 3
    allocs = {s["agent_id"]: s for s in stats["allocations"]}
    assert allocs[a["id"]]["memory_rss_mb"] > 10
    stopped = await api.client.post(f"/v1/admin/agents/{b['id']}/stop", headers=admin)
    assert stopped.status_code == 200 and "administrator" in stopped.json()["status_reason"]
    assert (await api.client.get(f"/v1/agents/{b['id']}", headers=bob)).json()["status"] == "stopped"
    audit = (await api.client.get("/v1/admin/audit", params={"action": "agent.force_stop"}, headers=admin)).json()
    assert [r["target"] for r in audit] == [b["id"]]


async def test_broadcast_reaches_every_running_agent(api: Api) -> None:
    _, alice = await api.new_customer("alice")
    agents = [await running_agent(api, alice, name=f"b{i}") for i in range(2)]
    nc = await nats.connect(api.control.settings.nats_url)
    heard: set[str] = set()

    async def on_event(msg: nats.aio.msg.Msg) -> None:
        event = json.loads(msg.data)
        if event["kind"] == "broadcast" and event["data"]["message"] == "maintenance at noon":
            heard.add(event["agent_id"])

    await nc.subscribe("caravan.events.*.agent.*", cb=on_event)
    response = await api.client.post(
        "/v1/admin/broadcast", json={"message": "maintenance at noon"}, headers=await api.admin()
    )
    assert response.status_code == 202 and response.json()["agents_running"] >= 2

    async def probe() -> set[str]:
        return heard

    await assert_eventually(probe, lambda h: {a["id"] for a in agents} <= h, what="every agent acknowledged")
    await nc.close()


async def test_rate_limits_answer_429_with_retry_after(api: Api) -> None:
    _, headers = await api.new_customer()
    strict = api.control.settings.model_copy(update={"rate_limit_scale": 0.05})  # standard: 1/s, burst 3
    async with serve_app(create_app(strict, api.control)) as base, httpx.AsyncClient(base_url=base) as client:
        codes = [(await client.get("/v1/agents", headers=headers)) for _ in range(5)]
        assert [r.status_code for r in codes[:3]] == [200, 200, 200]
        limited = codes[-1]
        assert limited.status_code == 429 and limited.json()["error"]["code"] == "rate_limited"
        assert int(limited.headers["Retry-After"]) >= 1
        admin = await api.admin()  # a bucket of its own: the customer's exhausted one does not hold it back
        assert [(await client.get("/v1/admin/stats", headers=admin)).status_code for _ in range(3)] == [200] * 3


async def test_a_new_tier_rates_the_customers_next_request_not_their_next_login(api: Api) -> None:
    customer_id, headers = await api.new_customer()  # their token says the tier they had: standard
    strict = api.control.settings.model_copy(update={"rate_limit_scale": 0.05})  # standard: burst 3, free: burst 1
    async with serve_app(create_app(strict, api.control)) as base, httpx.AsyncClient(base_url=base) as client:
        assert (await client.get("/v1/agents", headers=headers)).status_code == 200
        quota = f"/v1/admin/customers/{customer_id}/quota"
        assert (await client.put(quota, json={"tier": "free"}, headers=await api.admin())).status_code == 200
        codes = [(await client.get("/v1/agents", headers=headers)) for _ in range(2)]
        assert codes[0].status_code == 200
        assert codes[1].status_code == 429 and "free tier" in codes[1].json()["error"]["message"]


async def test_another_gateway_replica_sees_a_new_tier_once_what_it_read_is_five_seconds_old() -> None:
    clock, current = [0.0], {"cu-1": "standard"}

    async def read(customer_id: str) -> str:
        return current[customer_id]

    tiers = Tiers(ttl_s=5, clock=lambda: clock[0])
    assert await tiers.of("cu-1", read) == "standard"
    current["cu-1"] = "free"  # changed through another replica
    clock[0] = 4.9
    assert await tiers.of("cu-1", read) == "standard"
    clock[0] = 5.0
    assert await tiers.of("cu-1", read) == "free"


async def test_an_address_that_fails_to_authenticate_too_often_is_refused_unchecked_and_unaudited(api: Api) -> None:
    admin = await api.admin()
    customer_id, _ = await api.new_customer()
    made = await api.client.post(f"/v1/admin/customers/{customer_id}/keys", headers=admin)
    assert made.status_code == 201, made.text
    good_key = made.json()["api_key"]
    strict = api.control.settings.model_copy(update={"rate_limit_scale": 0.25})  # failures: burst 5, 1 per 4 s
    audited_before = len((await api.client.get("/v1/admin/audit", params={"limit": 1000}, headers=admin)).json())
    async with serve_app(create_app(strict, api.control)) as base, httpx.AsyncClient(base_url=base) as client:
        bad = [await client.post("/v1/auth/token", json={"api_key": "cvn_deadbeef_" + "x" * 40}) for _ in range(5)]
        assert [r.status_code for r in bad] == [401] * 5
        refused = await client.post("/v1/auth/token", json={"api_key": "cvn_deadbeef_" + "x" * 40})
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limited"
        assert int(refused.headers["Retry-After"]) >= 1
        # while throttled, nothing from the address is checked: not even a good key, nor a forged token
        assert (await client.post("/v1/auth/token", json={"api_key": good_key})).status_code == 429
        assert (await client.get("/v1/agents", headers={"Authorization": "Bearer forged"})).status_code == 429
    audited = (await api.client.get("/v1/admin/audit", params={"limit": 1000}, headers=admin)).json()
    assert len(audited) - audited_before == 5  # the five refusals; nothing of what came after


async def test_a_customer_refused_an_admin_route_again_and_again_cannot_fill_the_audit_log(api: Api) -> None:
    """Each 403 is a record in a log nobody may delete: they count as failed authentications (then 429, not
    recorded), and what a record keeps of the request is bounded (a path of 60,000 characters is not)."""
    admin = await api.admin()
    _, customer = await api.new_customer()
    strict = api.control.settings.model_copy(update={"rate_limit_scale": 0.25})  # failures: burst 5, 1 per 4 s
    before = (await api.client.get("/v1/admin/audit", params={"limit": 1000}, headers=admin)).json()
    path = "/v1/admin/customers/" + "a" * 60_000
    async with serve_app(create_app(strict, api.control)) as base, httpx.AsyncClient(base_url=base) as client:
        refused = [(await client.get(path, headers=customer)).status_code for _ in range(6)]
        assert refused == [403] * 5 + [429]
        assert (await client.get("/v1/agents", headers=customer)).status_code == 429  # until the address cools
    audited = (await api.client.get("/v1/admin/audit", params={"limit": 1000}, headers=admin)).json()
    new = audited[len(before) :]
    assert [(r["action"], r["role"]) for r in new] == [("auth.forbidden", "customer")] * 5  # who was refused
    for record in new:
        shown = record["details"]["path"]
        assert shown.startswith("/v1/admin/customers/aaaa") and shown.endswith("... (60020 characters)")
        assert len(json.dumps(record)) < 1_000


async def test_audit_records_logins_refusals_and_cannot_be_deleted(api: Api) -> None:
    customer_id, headers = await api.new_customer()
    await api.client.post("/v1/auth/token", json={"api_key": "cvn_deadbeef_" + "x" * 40})
    await api.client.get("/v1/admin/stats", headers=headers)
    await api.client.get("/v1/agents", headers={"Authorization": "Bearer forged"})
    admin = await api.admin()
    records = (await api.client.get("/v1/admin/audit", headers=admin)).json()
    actions = {(r["action"], r["result"]) for r in records}
    assert {
        ("auth.token", "ok"),
        ("auth.token", "denied"),
        ("auth.forbidden", "denied"),
        ("auth.denied", "denied"),
        ("customer.create", "ok"),
    } <= actions
    mine = (await api.client.get("/v1/admin/audit", params={"customer_id": customer_id}, headers=admin)).json()
    assert mine and all(r["customer_id"] == customer_id for r in mine)
    later = (await api.client.get("/v1/admin/audit", params={"since": "2999-01-01T00:00:00Z"}, headers=admin)).json()
    assert later == []
    nc = await nats.connect(api.control.settings.nats_url)
    js = nc.jetstream()
    assert await js.consumers_info(AUDIT_STREAM) == []  # each query's reader deleted as it answered, not 5 s later
    info = await js.stream_info(AUDIT_STREAM)
    assert info.config.deny_delete and info.config.deny_purge
    with pytest.raises(JetStreamError):
        await js.purge_stream(AUDIT_STREAM)
    with pytest.raises(JetStreamError):
        await js.delete_msg(AUDIT_STREAM, 1)
    assert (await js.stream_info(AUDIT_STREAM)).state.messages == info.state.messages
    await nc.close()


async def test_admin_routes_validate_input(api: Api) -> None:
    admin = await api.admin()
    # every agent writes a broadcast to its log as one line: nothing that would colour, erase or split it
    for message in ("", "   ", "x" * 2001, "a\u0000b", "\u001b[31mred", "two\nlines", "\u202eevil"):
        refused = await api.client.post("/v1/admin/broadcast", json={"message": message}, headers=admin)
        assert refused.status_code == 422 and "message: " in refused.json()["error"]["message"], message
    assert (
        await api.client.post("/v1/admin/broadcast", json={"message": "café 👩‍💻 ok"}, headers=admin)
    ).status_code == 202
    assert (await api.client.get("/v1/admin/audit", params={"action": "../x"}, headers=admin)).status_code == 422
    assert (await api.client.get("/v1/admin/customers/cu-000000000000", headers=admin)).status_code == 404
    assert (await api.client.post("/v1/admin/agents/ag-000000000000/stop", headers=admin)).status_code == 404


async def test_a_wildcard_for_an_id_finds_no_customers_agent_for_an_admin(api: Api) -> None:
    _, headers = await api.new_customer()
    created = await api.client.post("/v1/agents", json=agent_body(name="victim"), headers=headers)
    assert created.status_code == 201
    admin = await api.admin()
    for wildcard in ("*", "%3E", "ag-*"):  # NATS subject wildcards: a key lookup by them matched any agent
        assert (await api.client.get(f"/v1/agents/{wildcard}", headers=admin)).status_code == 404
        assert (await api.client.post(f"/v1/admin/agents/{wildcard}/stop", headers=admin)).status_code == 404
        assert (await api.client.delete(f"/v1/agents/{wildcard}", headers=admin)).status_code == 404
        engage = {"scope": "agent", "agent_id": wildcard.replace("%3E", ">"), "reason": "x"}
        assert (await api.client.post("/v1/admin/killswitch", json=engage, headers=admin)).status_code == 404
    agent = (await api.client.get(f"/v1/agents/{created.json()['id']}", headers=headers)).json()
    assert agent["desired"] == "running"


async def test_customer_names_that_hide_or_reorder_text_are_refused_and_nothing_is_stored(api: Api) -> None:
    admin = await api.admin()
    before = (await api.client.get("/v1/admin/customers", headers=admin)).json()
    for name in INVISIBLE_NAMES:
        refused = await api.client.post("/v1/admin/customers", json={"name": name}, headers=admin)
        assert refused.status_code == 422, (name, refused.text)
        error = refused.json()["error"]
        assert error["code"] == "invalid" and error["details"][0]["field"] == "name", error
        assert f"U+{ord(next(c for c in name if not c.isalnum())):04X}" in error["message"], error
    # spaces only (an ideographic one too), or fillers that show as nothing: nothing to tell customers apart
    for blank in (" ", "   ", "\u3000", "\u3164", "\u115f", "\u2800", "\u034f"):
        refused = await api.client.post("/v1/admin/customers", json={"name": blank}, headers=admin)
        assert refused.status_code == 422 and "only spaces" in refused.json()["error"]["message"], refused.text
    assert (await api.client.get("/v1/admin/customers", headers=admin)).json() == before
    for name in READABLE_NAMES:
        created = await api.client.post("/v1/admin/customers", json={"name": name}, headers=admin)
        assert created.status_code == 201 and created.json()["name"] == name, created.text


async def test_an_unexpected_error_is_a_500_in_the_error_shape_with_a_request_id_for_the_log(
    api: Api, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken() -> None:
        raise RuntimeError("the secret internals at /var/lib/caravan")

    monkeypatch.setattr(api.control.stats, "overview", broken)
    response = await api.client.get("/v1/admin/stats", headers=await api.admin())
    assert response.status_code == 500
    error = response.json()["error"]
    request_id = error["details"]["request_id"]
    assert error["code"] == "internal" and request_id in error["message"]
    assert response.headers["X-Request-ID"] == request_id
    assert "secret" not in response.text and "RuntimeError" not in response.text
    logged = [r for r in caplog.records if request_id in r.getMessage()]
    assert logged and logged[0].exc_info and "the secret internals" in str(logged[0].exc_info[1])


@pytest.mark.parametrize("bound", ["since", "until"])
async def test_audit_times_without_a_timezone_are_422_and_with_one_are_answered(api: Api, bound: str) -> None:
    admin = await api.admin()
    naive = await api.client.get("/v1/admin/audit", params={bound: "2024-01-01T00:00:00"}, headers=admin)
    assert naive.status_code == 422, naive.text
    error = naive.json()["error"]
    assert error["code"] == "invalid" and bound in error["message"] and "timezone" in error["message"]
    for aware in ("2024-01-01T00:00:00Z", "2024-01-01T02:00:00+02:00"):
        answered = await api.client.get("/v1/admin/audit", params={bound: aware}, headers=admin)
        assert answered.status_code == 200, answered.text
        assert (answered.json() == []) is (bound == "until")  # everything was recorded after 2024
    for beyond in ("0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-14:00"):  # no such time in UTC
        refused = await api.client.get("/v1/admin/audit", params={bound: beyond}, headers=admin)
        assert refused.status_code == 422, refused.text
        assert bound in refused.json()["error"]["message"] and "UTC" in refused.json()["error"]["message"]
    # a number was read as Unix time, in seconds or in milliseconds as its size made pydantic guess (99999999999:
    # 1973), where a time without a zone is refused as a guess
    for number in ("0.5", "1700000000", "99999999999", "-1", "1e9", " 17 "):
        refused = await api.client.get("/v1/admin/audit", params={bound: number}, headers=admin)
        assert refused.status_code == 422, (number, refused.text)
        assert f"{bound}: must be a time with a timezone" in refused.json()["error"]["message"], refused.text


async def test_an_audit_query_since_a_time_after_its_until_is_422(api: Api) -> None:
    admin = await api.admin()
    bounds = {"since": "2030-01-01T00:00:01Z", "until": "2030-01-01T01:00:00+01:00"}  # one second apart, in UTC
    refused = await api.client.get("/v1/admin/audit", params=bounds, headers=admin)
    assert refused.status_code == 422, refused.text
    assert refused.json()["error"]["message"] == (
        "since (2030-01-01T00:00:01+00:00) is after until (2030-01-01T00:00:00+00:00): no record is both"
    )
    same = await api.client.get("/v1/admin/audit", params={**bounds, "since": bounds["until"]}, headers=admin)
    assert (same.status_code, same.json()) == (200, [])  # the one instant: answered


@pytest.mark.parametrize("bound", ["since", "until"])
async def test_an_audit_time_whose_offset_lost_its_plus_in_the_url_says_so(api: Api, bound: str) -> None:
    # `curl "$BASE/v1/admin/audit?since=2024-01-01T00:00:00+02:00"`: a query's `+` is a space, so the API reads
    # "2024-01-01T00:00:00 02:00", which pydantic called "unexpected extra characters" without saying why
    admin = await api.admin()
    for sent in ("2024-01-01T00:00:00+02:00", "2024-01-01T00:00+0200", "2024-01-01 00:00:00.5+02"):
        url = f"/v1/admin/audit?{bound}={sent}"  # as a shell user types it: the `+` not encoded
        refused = await api.client.get(url, headers=admin)
        assert refused.status_code == 422, (sent, refused.text)
        error = refused.json()["error"]
        assert error["code"] == "invalid" and f"{bound}: " in error["message"], refused.text
        assert "%2B" in error["message"] and "'+'" in error["message"], refused.text
    encoded = await api.client.get("/v1/admin/audit", params={bound: "2024-01-01T02:00:00+02:00"}, headers=admin)
    assert encoded.status_code == 200, encoded.text
    naive = await api.client.get("/v1/admin/audit", params={bound: "2024-01-01 00:00"}, headers=admin)
    assert naive.status_code == 422 and "%2B" not in naive.text, naive.text  # no offset at all: not this


async def test_audit_since_a_time_long_before_any_record_finds_them_all(api: Api) -> None:
    admin = await api.admin()

    async def since(when: str | None) -> list[str]:
        response = await api.client.get("/v1/admin/audit", params={"since": when} if when else {}, headers=admin)
        assert response.status_code == 200, response.text
        return [r["id"] for r in response.json()]

    everything = await since(None)
    assert everything
    for when in ("1000-01-01T00:00:00Z", "1677-01-01T00:00:00Z", "1969-12-31T00:00:00Z"):
        assert await since(when) == everything, when
    assert await since("3000-01-01T00:00:00Z") == []


async def audit(api: Api, **params: Any) -> list[dict[str, Any]]:
    response = await api.client.get("/v1/admin/audit", params={"limit": 1000, **params}, headers=await api.admin())
    assert response.status_code == 200, response.text
    return list(response.json())


async def test_what_admins_do_on_the_customer_routes_is_audited_and_what_customers_do_is_not(api: Api) -> None:
    customer_id, customer = await api.new_customer()
    admin = await api.admin()
    slow = {**REPLAY, "delay_ms": 60_000}  # its task is still running when the admin cancels it
    own = await api.client.post("/v1/agents", json=agent_body(name="own", model=slow), headers=customer)
    assert own.status_code == 201, own.text
    made = await api.client.post("/v1/agents", params={"customer_id": customer_id}, json=agent_body(), headers=admin)
    assert made.status_code == 201, made.text
    agent_id = made.json()["id"]
    for method, path, body in [
        ("PATCH", f"/v1/agents/{agent_id}", {"replicas": 2}),
        ("POST", f"/v1/agents/{agent_id}/stop", None),
        ("POST", f"/v1/agents/{agent_id}/start", None),
    ]:
        response = await api.client.request(method, path, json=body, headers=admin)
        assert response.status_code == 200, response.text
    team = {"name": "solo", "members": [agent_id], "mode": "round_robin", "termination": {"max_messages": 2}}
    made_team = await api.client.post("/v1/teams", params={"customer_id": customer_id}, json=team, headers=admin)
    assert made_team.status_code == 201, made_team.text
    team_id = made_team.json()["id"]
    assert (await api.client.delete(f"/v1/teams/{team_id}", headers=admin)).status_code == 204
    assert (await api.client.delete(f"/v1/agents/{agent_id}", headers=admin)).status_code == 204
    task_id = await start_task(api, customer, own.json()["id"], "wait for it")
    assert (await api.client.post(f"/v1/tasks/{task_id}/cancel", headers=admin)).status_code == 202
    assert (await api.client.post(f"/v1/agents/{own.json()['id']}/stop", headers=customer)).status_code == 200

    kinds = ("agent", "team", "task")
    records = [r for r in await audit(api, customer_id=customer_id) if r["action"].split(".")[0] in kinds]
    assert [(r["action"], r["target"], r["result"]) for r in records] == [
        ("agent.create", agent_id, "ok"),
        ("agent.update", agent_id, "ok"),
        ("agent.stop", agent_id, "ok"),
        ("agent.start", agent_id, "ok"),
        ("team.create", team_id, "ok"),
        ("team.delete", team_id, "ok"),
        ("agent.delete", agent_id, "ok"),
        ("task.cancel", task_id, "ok"),
    ]
    assert {r["actor"] for r in records} == {records[0]["actor"]} and records[0]["role"] == "admin"
    assert records[1]["details"] == {"fields": ["replicas"]}
    prefix = records[0]["actor"].removeprefix("admin:")  # an admin named by its key's prefix alone, as the CLI does
    by_prefix = await audit(api, customer_id=customer_id, actor=prefix)
    assert by_prefix == await audit(api, customer_id=customer_id, actor=f"admin:{prefix}")
    assert by_prefix and {r["actor"] for r in by_prefix} == {f"admin:{prefix}"}


async def test_failed_admin_actions_are_audited_with_the_error(api: Api) -> None:
    admin = await api.admin()
    missing_agent, missing_customer = "ag-000000000000", "cu-000000000000"
    for method, path, body, params in [
        ("PATCH", f"/v1/agents/{missing_agent}", {"replicas": 2}, None),
        ("POST", f"/v1/admin/agents/{missing_agent}/stop", None, None),
        ("PUT", f"/v1/admin/customers/{missing_customer}/quota", {"max_agents": 1}, None),
        ("DELETE", "/v1/admin/keys/cvn_nothere", None, None),
        ("POST", "/v1/agents", agent_body(), {"customer_id": missing_customer}),
    ]:
        response = await api.client.request(method, path, json=body, params=params, headers=admin)
        assert response.status_code == 404, (path, response.text)
    failed = [r for r in await audit(api) if r["result"] == "failed"]
    assert [(r["action"], r["target"] or r["customer_id"]) for r in failed] == [
        ("agent.update", missing_agent),
        ("agent.force_stop", missing_agent),
        ("quota.set", missing_customer),
        ("key.revoke", "cvn_nothere"),
        ("agent.create", missing_customer),
    ]
    assert all(r["details"]["error"]["code"] == "not_found" for r in failed)
    assert "not found" in failed[0]["details"]["error"]["message"]
    assert (await api.client.get("/v1/admin/agents", headers=admin)).json() == []  # nothing half-made


async def test_an_id_in_an_admins_path_is_audited_on_one_line_and_cut_short(api: Api) -> None:
    """The audit log keeps the id an admin's request named, whatever it was: one with a line break or a
    reordering character must not read as two lines or another id, nor a long one bury the record."""
    admin = await api.admin()
    for sent in ("ag-0\nforged", "ag-\u202e0", "ag-" + "0" * 5000):
        response = await api.client.post(f"/v1/admin/agents/{quote(sent, safe='')}/stop", headers=admin)
        assert response.status_code == 404, response.text
    targets = [r["target"] for r in await audit(api) if r["action"] == "agent.force_stop"]
    assert targets[:2] == ["ag-0\\nforged", "ag-\\u202e0"]
    assert targets[2] == "ag-" + "0" * 97 + "... (5003 characters)"


async def test_an_action_on_what_is_no_customer_id_is_audited_with_it_as_its_target_alone(api: Api) -> None:
    """A customer id that is none (`a.b`, a pattern) was recorded as the record's customer: under which no audit
    query can find it (`?customer_id=a.b` is 422). It is the record's target."""
    admin = await api.admin()
    for sent in ("a.b", "cu-*"):
        response = await api.client.put(f"/v1/admin/customers/{sent}/quota", json={}, headers=admin)
        assert response.status_code == 404, response.text
        response = await api.client.post(f"/v1/admin/customers/{sent}/keys", headers=admin)
        assert response.status_code == 404, response.text
    failed = [(r["action"], r["customer_id"], r["target"]) for r in await audit(api) if r["result"] == "failed"]
    assert failed == [
        ("quota.set", None, "a.b"),
        ("key.create", None, "a.b"),
        ("quota.set", None, "cu-*"),
        ("key.create", None, "cu-*"),
    ]


async def test_a_failed_admin_action_on_a_customers_record_is_found_under_that_customer(api: Api) -> None:
    """An operator who reads one customer's audit sees what an admin tried on its records and could not do, not
    only what worked: the record names the customer whatever the action's outcome."""
    customer_id, customer = await api.new_customer()
    admin = await api.admin()
    agent = await running_agent(api, customer)
    task_id = await start_task(api, customer, agent["id"])
    assert (await finished(api, customer, task_id))["status"] == "completed"
    slow = {"provider": "replay", "name": "slow", "responses": ["..."], "delay_ms": 600_000}
    member = await running_agent(api, customer, name="slow", model=slow, tools=[])
    team = {"name": "solo", "members": [member["id"]], "mode": "round_robin", "termination": {"max_messages": 2}}
    team_id = (await api.client.post("/v1/teams", json=team, headers=customer)).json()["id"]
    started = await api.client.post("/v1/tasks", json={"team_id": team_id, "task": "hi"}, headers=customer)
    assert started.status_code == 202, started.text
    assert (await api.client.post(f"/v1/tasks/{task_id}/cancel", headers=admin)).status_code == 409  # it ended
    assert (await api.client.delete(f"/v1/teams/{team_id}", headers=admin)).status_code == 409  # a task is open
    records = [r for r in await audit(api, customer_id=customer_id) if r["result"] == "failed"]
    assert [(r["action"], r["target"], r["details"]["error"]["code"]) for r in records] == [
        ("task.cancel", task_id, "conflict"),
        ("team.delete", team_id, "conflict"),
    ]


async def test_a_team_with_an_unfinished_task_is_not_deleted_and_its_customers_ended_tasks_are_not_read(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deleting a team looks only at the customer's tasks in flight (their quota slots), however many ended."""
    _, customer = await api.new_customer()
    agent = await running_agent(api, customer)
    ended = [await start_task(api, customer, agent["id"]) for _ in range(3)]
    for task_id in ended:
        assert (await finished(api, customer, task_id))["status"] == "completed"
    slow = {"provider": "replay", "name": "slow", "responses": ["..."], "delay_ms": 600_000}
    member = await running_agent(api, customer, name="slow", model=slow, tools=[])
    team = {"name": "solo", "members": [member["id"]], "mode": "round_robin", "termination": {"max_messages": 2}}
    team_id = (await api.client.post("/v1/teams", json=team, headers=customer)).json()["id"]
    open_id = (await api.client.post("/v1/tasks", json={"team_id": team_id, "task": "hi"}, headers=customer)).json()[
        "id"
    ]
    read = named_reads(monkeypatch, api.control.teams._tasks)  # (a listing fails the delete)

    refused = await api.client.delete(f"/v1/teams/{team_id}", headers=customer)
    assert refused.status_code == 409 and open_id in refused.json()["error"]["message"]
    assert set(read) == {open_id}  # the task in flight alone, none of those that ended
    monkeypatch.undo()
    assert (await api.client.post(f"/v1/tasks/{open_id}/cancel", headers=customer)).status_code == 202
    assert (await finished(api, customer, open_id))["status"] == "cancelled"
    read = named_reads(monkeypatch, api.control.teams._tasks)
    assert (await api.client.delete(f"/v1/teams/{team_id}", headers=customer)).status_code == 204
    assert not set(ended) & set(read)


async def test_admins_list_one_customers_records_and_a_customer_cannot_name_another(api: Api) -> None:
    """``?customer_id=`` narrows an admin's listings to one customer; a customer naming another is refused (it
    used to be ignored, as it was on create, where the record went to the caller all the same)."""
    alice_id, alice = await api.new_customer("alice")
    bob_id, bob = await api.new_customer("bob")
    agents = {who: await running_agent(api, headers) for who, headers in (("alice", alice), ("bob", bob))}
    for who, headers in (("alice", alice), ("bob", bob)):
        await finished(api, headers, await start_task(api, headers, agents[who]["id"]))
        team = {"name": who, "members": [agents[who]["id"]], "termination": {"max_messages": 2}}
        assert (await api.client.post("/v1/teams", json=team, headers=headers)).status_code == 201
    admin = await api.admin()
    for path in ("/v1/agents", "/v1/admin/agents", "/v1/tasks", "/v1/teams", "/v1/admin/keys", "/v1/admin/audit"):
        every = (await api.client.get(path, headers=admin)).json()
        alices = (await api.client.get(path, params={"customer_id": alice_id}, headers=admin)).json()
        assert {r["customer_id"] for r in every} >= {alice_id, bob_id}, path
        assert alices and alices == [r for r in every if r["customer_id"] == alice_id], path
        bad = await api.client.get(path, params={"customer_id": ">"}, headers=admin)
        assert bad.status_code == 422, (path, bad.text)
        if path.startswith("/v1/admin"):
            continue
        own = await api.client.get(path, params={"customer_id": alice_id}, headers=alice)
        assert own.status_code == 200 and own.json() == alices, path
        other = await api.client.get(path, params={"customer_id": bob_id}, headers=alice)
        assert (other.status_code, other.json()["error"]["code"]) == (403, "forbidden"), path
    created = await api.client.post("/v1/agents", params={"customer_id": bob_id}, json=agent_body(), headers=alice)
    assert created.status_code == 403, created.text
    assert [a["id"] for a in (await api.client.get("/v1/agents", headers=alice)).json()] == [agents["alice"]["id"]]


async def test_what_only_a_customer_does_is_403_to_an_admin_saying_what_to_do_instead(api: Api) -> None:
    """An admin's well-formed request there is no bad input (422 said so): the role may not, and nothing starts."""
    customer_id, headers = await api.new_customer()
    agent = await running_agent(api, headers)
    admin = await api.admin()
    started = await api.client.post("/v1/tasks", json={"agent_id": agent["id"], "task": "hi"}, headers=admin)
    assert started.status_code == 403 and started.json()["error"]["code"] == "forbidden", started.text
    assert "customer who owns the agent" in started.json()["error"]["message"]
    assert (await api.client.get("/v1/tasks", params={"customer_id": customer_id}, headers=admin)).json() == []
    usage = await api.client.get("/v1/usage", headers=admin)
    assert usage.status_code == 403 and "/v1/admin/customers/{id}" in usage.json()["error"]["message"], usage.text


async def test_a_query_parameter_the_route_does_not_take_is_422_naming_those_it_takes(api: Api) -> None:
    """A typo was ignored: ``?customer=`` for ``?customer_id=`` gave an admin every customer's tasks."""
    customer_id, headers = await api.new_customer()
    admin = await api.admin()
    typo = await api.client.get("/v1/tasks", params={"customer": customer_id}, headers=admin)
    assert typo.status_code == 422, typo.text
    assert typo.json()["error"]["details"] == [
        {
            "field": "customer",
            "message": "unknown query parameter "
            "(this route takes agent_id, before, customer_id, limit, status, team_id)",
            "type": "unknown_parameter",
        }
    ]
    assert (await api.client.get("/v1/tasks", params={"customer_id": customer_id}, headers=admin)).status_code == 200
    none = await api.client.get("/v1/usage", params={"x": "1"}, headers=headers)
    assert none.status_code == 422 and "this route takes none" in none.text, none.text
    # the caller first, as for any refusal: who may not call the route learns nothing of its parameters
    assert (await api.client.get("/v1/tasks", params={"customer": "x"})).status_code == 401
    assert (await api.client.get("/v1/admin/audit", params={"bogus": "1"}, headers=headers)).status_code == 403
    # probes and the dashboard's assets take what they are sent
    assert (await api.client.get("/healthz", params={"probe": "1"})).status_code == 200
    assert (await api.client.get("/dashboard", params={"v": "2"})).status_code == 200


async def test_a_body_field_the_request_does_not_take_is_422_naming_those_it_takes(api: Api) -> None:
    """``target`` for ``agent_id`` (every answer and listing of the killswitch names a flag's ``target``) was
    refused as "Extra inputs are not permitted", naming none of the fields the request takes; so was a typo inside
    an object of the body, and nothing is made of such a request."""
    admin = await api.admin()
    engage = {"scope": "agent", "target": "ag-000000000000", "reason": "drill"}
    typo = await api.client.post("/v1/admin/killswitch", json=engage, headers=admin)
    assert typo.status_code == 422, typo.text
    assert typo.json()["error"]["details"] == [
        {
            "field": "target",
            "message": "unknown field (this object takes agent_id, customer_id, engaged, hard, reason, scope, wait_ms)",
            "type": "extra_forbidden",
        }
    ]
    assert (await api.client.get("/v1/admin/killswitch", headers=admin)).json() == []
    _, headers = await api.new_customer()
    model = {"provider": "replay", "name": "scripted", "responzes": ["Hello!"]}
    nested = await api.client.post("/v1/agents", json={"name": "a", "model": model}, headers=headers)
    assert nested.status_code == 422, nested.text
    [detail] = nested.json()["error"]["details"]
    assert detail["field"] == "model.responzes" and "(this object takes " in detail["message"], detail
    assert "responses" in detail["message"] and "provider" in detail["message"], detail
    assert (await api.client.get("/v1/agents", headers=headers)).json() == []


async def test_a_query_parameter_given_twice_is_422_rather_than_the_last_one_counting(api: Api) -> None:
    """Of ``?status=running&status=failed`` the last counted: a listing of failed tasks only, said nowhere. No
    route takes a list in its query, so a repeated parameter is refused, and what it would have made is not."""
    customer_id, headers = await api.new_customer()
    other_id, _ = await api.new_customer()
    admin = await api.admin()
    agent = await running_agent(api, headers)
    await finished(api, headers, await start_task(api, headers, agent["id"]))
    twice = await api.client.get("/v1/tasks", params=[("status", "completed"), ("status", "failed")], headers=headers)
    assert twice.status_code == 422, twice.text
    assert twice.json()["error"]["details"] == [
        {"field": "status", "message": "given 2 times: give it once", "type": "repeated_parameter"}
    ]
    assert [t["status"] for t in (await api.client.get("/v1/tasks", headers=headers)).json()] == ["completed"]
    # a repeated and an unknown one are both named; the same value twice is refused too
    both = await api.client.get("/v1/tasks", params=[("limit", "5"), ("limit", "5"), ("stat", "x")], headers=headers)
    assert both.status_code == 422, both.text
    assert [(d["field"], d["type"]) for d in both.json()["error"]["details"]] == [
        ("stat", "unknown_parameter"),
        ("limit", "repeated_parameter"),
    ]
    # an admin's create for one of two customers makes nothing for either
    made = await api.client.post(
        "/v1/agents", params=[("customer_id", customer_id), ("customer_id", other_id)], json=agent_body(), headers=admin
    )
    assert made.status_code == 422 and made.json()["error"]["details"][0]["field"] == "customer_id", made.text
    for owner in (customer_id, other_id):
        listed = await api.client.get("/v1/agents", params={"customer_id": owner}, headers=admin)
        assert [a["id"] for a in listed.json()] == ([agent["id"]] if owner == customer_id else []), listed.text
    # the caller first, as for any refusal
    assert (await api.client.get("/v1/tasks", params=[("limit", "1"), ("limit", "2")])).status_code == 401
