"""The `caravan customers`, `keys`, `agents`, `broadcast`, `quota`, `audit` and `stats` verbs against a running
gateway: what they print for a person and with --json, what they change, and what they say (exit 2, nothing sent)
when the operator's input is wrong. The killswitch verbs are in test_cli.py."""

from __future__ import annotations

import json
from typing import Any

import jwt
import nats
import pytest

from control.models import Customer
from control.store import Repo
from tests.conftest import ADMIN_KEY, Api
from tests.control.test_cli import run_cli
from tests.gateway.test_agents_api import created_running, wait_status
from tests.support.helpers import assert_eventually


def common(api: Api) -> list[str]:
    return ["--url", api.base, "--api-key", ADMIN_KEY]


async def quota_of(api: Api, customer_id: str) -> dict[str, Any]:
    customer = await api.client.get(f"/v1/admin/customers/{customer_id}", headers=await api.admin())
    return dict(customer.json()["usage"]["quota"])


async def audit(api: Api, action: str) -> list[dict[str, Any]]:
    records = await api.client.get("/v1/admin/audit", params={"action": action}, headers=await api.admin())
    return list(records.json())


async def test_quota_set_changes_the_limits_given_and_show_prints_them_with_usage(
    api: Api, capsys: pytest.CaptureFixture[str]
) -> None:
    customer_id, _ = await api.new_customer("acme")
    default = api.control.settings.max_agents_per_customer
    argv = ["quota", "set", customer_id, "--max-agents", "3", "--tokens-per-day", "5000", "--tier", "free"]
    assert await run_cli(*argv, *common(api)) == 0
    assert f"quota of {customer_id} changed: tier free, max_agents 3, tokens_per_day 5000" in capsys.readouterr().out
    assert await run_cli("quota", "set", customer_id, "--tokens-per-day", "UNLIMITED", *common(api)) == 0
    capsys.readouterr()
    quota = await quota_of(api, customer_id)
    assert quota == {
        "tier": "free",
        "max_agents": 3,
        "max_cpu": None,
        "max_memory_mb": None,
        "max_concurrent_tasks": None,
        "tokens_per_day": None,
    }
    assert await run_cli("quota", "show", customer_id, *common(api)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"customer {customer_id} (acme)"
    assert lines[1].split() == ["tier", "free"]
    assert lines[3].split() == ["agents", "3", "0"]
    assert lines[-1].split() == ["tokens", "today", "unlimited", "0"]
    assert await run_cli("quota", "show", customer_id, "--json", *common(api)) == 0
    assert json.loads(capsys.readouterr().out)["quota"] == quota
    assert await run_cli("quota", *common(api), "reset", customer_id) == 0  # the options before the verb count too
    assert f"quota of {customer_id} reset" in capsys.readouterr().out
    assert (await quota_of(api, customer_id))["max_agents"] == default
    assert [r["details"]["changes"] for r in await audit(api, "quota.change")] == [
        {"max_agents": 3, "tier": "free", "tokens_per_day": 5000},
        {"tokens_per_day": None},
    ]


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["quota", "set", "{customer}"], "nothing to change: give at least one of --tier, --max-agents"),
        (["quota", "set", "", "--max-agents", "1"], "customer_id '' is not a customer id"),
        (["quota", "show", " "], "customer_id ' ' is not a customer id"),
        (["quota", "set", "{customer}", "--max-agents", "-1"], "--max-agents: not a whole number"),
        (["quota", "set", "{customer}", "--max-cpu", "lots"], "--max-cpu: not a whole number"),
        (["quota", "set", "{customer}", "--tier", "platinum"], "--tier: invalid choice"),
        (["audit", "--limit", "0"], "--limit: not a number from 1 to 1000"),
        (["audit", "--customer", ""], "--customer '' is not a customer id"),
        (["audit", "--since", "yesterday"], "--since: not a time with its timezone"),
        (["audit", "--until", "2030-01-01T00:00:00"], "--until: not a time with its timezone"),
        (["audit", "--since", "20300101T000000Z"], "--since: not a time with its timezone"),  # Python's alone
        (["audit", "--since", "0001-01-01T00:00:00+01:00"], "--since: not a time with its timezone"),  # not in UTC
    ],
)
async def test_bad_input_is_bad_usage_and_changes_nothing(
    argv: list[str], said: str, api: Api, capsys: pytest.CaptureFixture[str]
) -> None:
    customer_id, _ = await api.new_customer()
    before = await quota_of(api, customer_id)
    assert await run_cli(*(arg.format(customer=customer_id) for arg in argv), *common(api)) == 2
    assert said in capsys.readouterr().err
    assert await quota_of(api, customer_id) == before
    assert await audit(api, "quota.change") == []


async def test_what_the_api_refuses_is_said_with_its_error(api: Api, capsys: pytest.CaptureFixture[str]) -> None:
    assert await run_cli("quota", "show", "cu-000000000000", *common(api)) == 1
    assert "GET /v1/admin/customers/cu-000000000000 failed (404) not_found: " in capsys.readouterr().err
    assert (
        await run_cli("audit", "--since", "2030-01-02T00:00:00Z", "--until", "2030-01-01T00:00:00Z", *common(api)) == 1
    )
    assert (
        "failed (422) invalid: since (2030-01-02T00:00:00+00:00) is after until (2030-01-01T00:00:00+00:00): no "
        "record is both" in capsys.readouterr().err
    )
    customer_key = (await api.client.post("/v1/admin/customers", json={"name": "x"}, headers=await api.admin())).json()
    assert await run_cli("stats", "--url", api.base, "--api-key", customer_key["api_key"]) == 1
    assert "failed (403) forbidden: " in capsys.readouterr().err


async def test_audit_prints_the_records_that_match(api: Api, capsys: pytest.CaptureFixture[str]) -> None:
    customer_id, _ = await api.new_customer()
    assert await run_cli("quota", "set", customer_id, "--max-cpu", "700", *common(api)) == 0
    capsys.readouterr()
    assert await run_cli("audit", "--action", "quota.change", "--customer", customer_id, *common(api)) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert " ok " in line and "(admin)  quota.change" in line and f"customer_id={customer_id}" in line
    assert '"changes":{"max_cpu":700}' in line
    assert await run_cli("audit", "--action", "quota.change", "--json", *common(api)) == 0
    assert json.loads(capsys.readouterr().out) == await audit(api, "quota.change")
    assert await run_cli("audit", "--action", "key.revoke", *common(api)) == 0
    assert capsys.readouterr().out == "no audit records match\n"

    actor = (await audit(api, "quota.change"))[0]["actor"]  # admin:<its key's prefix>
    for named in (actor, actor.removeprefix("admin:")):  # as the log names it, or by the prefix alone (as --help)
        assert await run_cli("audit", "--action", "quota.change", "--actor", named, "--json", *common(api)) == 0
        assert [r["actor"] for r in json.loads(capsys.readouterr().out)] == [actor], named


async def test_stats_and_customers(api: Api, capsys: pytest.CaptureFixture[str]) -> None:
    first, _ = await api.new_customer("first")
    second, _ = await api.new_customer("second")
    assert await run_cli("customers", *common(api)) == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed[0].split() == ["ID", "CREATED", "NAME"]
    assert [(line.split()[0], line.split()[-1]) for line in listed[1:]] == [(first, "first"), (second, "second")]
    assert await run_cli("stats", *common(api)) == 0
    out = capsys.readouterr().out
    assert out.startswith("customers    2\n") and "allocations  none reported" in out
    assert await run_cli("stats", "--json", *common(api)) == 0
    assert json.loads(capsys.readouterr().out)["customers"] == 2


async def test_text_from_outside_cannot_drive_the_operators_terminal(
    api: Api, capsys: pytest.CaptureFixture[str]
) -> None:
    """A flag engaged by hand in the flag store holds whatever its writer typed: its escape sequences are printed
    as text, not sent to the terminal."""
    kv = await api.control.jet.nc.jetstream().key_value("caravan_flags")
    await kv.put("killswitch.all", "\x1b]0;pwned\x07\x1b[2Jmaintenance\u202eevil".encode())
    assert await run_cli("killswitch", "status", *common(api)) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out
    assert "\\x1b]0;pwned\\x07\\x1b[2Jmaintenance\\u202eevil" in out


async def logs_in(api: Api, api_key: str) -> dict[str, Any] | None:
    """The token answer ``api_key`` gets, None if it is refused (401)."""
    response = await api.client.post("/v1/auth/token", json={"api_key": api_key})
    assert response.status_code in (200, 401), response.text
    return dict(response.json()) if response.status_code == 200 else None


async def customer_behind(api: Api, api_key: str) -> str:
    """The customer whose key ``api_key`` is: the one the token it logs in with names (and may act as)."""
    answer = await logs_in(api, api_key)
    assert answer is not None and answer["role"] == "customer", answer
    customer_id = str(jwt.decode(answer["access_token"], options={"verify_signature": False})["cid"])
    own = await api.client.get("/v1/agents", params={"customer_id": customer_id}, headers=await api.token(api_key))
    assert own.status_code == 200, own.text
    return customer_id


async def test_customers_create_shows_the_key_once_and_it_logs_in_as_that_customer(
    api: Api, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await run_cli("customers", "create", "Acme Ltd", *common(api)) == 0
    lines = capsys.readouterr().out.splitlines()
    listed = (await api.client.get("/v1/admin/customers", headers=await api.admin())).json()
    assert [c["name"] for c in listed] == ["Acme Ltd"]
    customer_id = listed[0]["id"]
    assert lines[0] == f"customer {customer_id} (Acme Ltd) created, with its first API key:"
    api_key = lines[1].strip()
    assert "will not be shown again" in lines[2] and api_key[:12] in lines[2]
    assert (await logs_in(api, api_key) or {}).get("role") == "customer"
    assert await customer_behind(api, api_key) == customer_id
    assert [r["customer_id"] for r in await audit(api, "customer.create")] == [customer_id]

    assert await run_cli("customers", "create", "Globex", "--json", *common(api)) == 0
    created = json.loads(capsys.readouterr().out)
    assert set(created) == {"id", "name", "created_at", "api_key", "api_key_prefix"} and created["name"] == "Globex"
    assert await customer_behind(api, created["api_key"]) == created["id"]

    # listed as before (no verb), or with `list`; the keys are never listed
    assert await run_cli("customers", *common(api)) == 0
    without_verb = capsys.readouterr().out
    assert await run_cli("customers", "list", *common(api)) == 0
    assert capsys.readouterr().out == without_verb
    assert [line.split()[0] for line in without_verb.splitlines()[1:]] == [customer_id, created["id"]]
    assert api_key not in without_verb and created["api_key"] not in without_verb
    assert await run_cli("customers", "--json", "list", *common(api)) == 0  # an option before the verb counts
    assert [c["id"] for c in json.loads(capsys.readouterr().out)] == [customer_id, created["id"]]

    assert await run_cli("customers", "show", customer_id, *common(api)) == 0
    shown = capsys.readouterr().out.splitlines()
    assert shown[0].startswith(f"customer {customer_id} (Acme Ltd), created ")
    assert shown[3].split() == ["agents", str(api.control.settings.max_agents_per_customer), "0"]
    assert await run_cli("customers", "show", customer_id, "--json", *common(api)) == 0
    detail = json.loads(capsys.readouterr().out)
    assert (detail["id"], detail["name"], detail["usage"]["agents"]) == (customer_id, "Acme Ltd", 0)
    assert "api_key" not in detail


async def test_keys_create_list_and_revoke(api: Api, capsys: pytest.CaptureFixture[str]) -> None:
    customer_id, _ = await api.new_customer()
    other_id, _ = await api.new_customer("other")
    assert await run_cli("keys", "create", customer_id, *common(api)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"new API key of customer {customer_id}:"
    api_key = lines[1].strip()
    prefix = api_key[:12]
    assert "will not be shown again" in lines[2] and prefix in lines[2]
    assert await customer_behind(api, api_key) == customer_id
    assert await run_cli("keys", "create", customer_id, "--json", *common(api)) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["api_key"].startswith(second["api_key_prefix"]) and await logs_in(api, second["api_key"])

    assert await run_cli("keys", "list", "--customer", customer_id, *common(api)) == 0
    listed = capsys.readouterr().out
    rows = [line.split() for line in listed.splitlines()]
    assert rows[0] == ["PREFIX", "ROLE", "CUSTOMER", "CREATED", "REVOKED"]
    assert [row[0] for row in rows[1:]][1:] == [prefix, second["api_key_prefix"]]  # after the customer's first
    assert {(row[1], row[2], row[4]) for row in rows[1:]} == {("customer", customer_id, "-")}
    assert api_key not in listed and second["api_key"] not in listed
    assert await run_cli("keys", "list", "--json", *common(api)) == 0
    every = json.loads(capsys.readouterr().out)
    assert {k["customer_id"] for k in every} == {None, customer_id, other_id}  # the admin's key, and both customers'

    assert await run_cli("keys", "revoke", prefix, *common(api)) == 0
    assert capsys.readouterr().out.startswith(f"key {prefix} revoked")
    assert await logs_in(api, api_key) is None
    assert await logs_in(api, second["api_key"]) is not None  # the customer's other keys still log in
    assert await run_cli("keys", "list", "--customer", customer_id, "--json", *common(api)) == 0
    revoked = {k["prefix"]: k["revoked_at"] for k in json.loads(capsys.readouterr().out)}
    assert revoked[prefix] is not None and revoked[second["api_key_prefix"]] is None
    assert [r["target"] for r in await audit(api, "key.revoke")] == [prefix]


async def test_agents_list_and_stop_any_customers_agent(api: Api, capsys: pytest.CaptureFixture[str]) -> None:
    alice_id, alice = await api.new_customer("alice")
    bob_id, bob = await api.new_customer("bob")
    a = await created_running(api, alice, name="helper_a")
    b = await created_running(api, bob, name="helper_b")
    assert await run_cli("agents", "list", *common(api)) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert rows[0] == ["ID", "CUSTOMER", "STATUS", "NAME"]
    assert sorted(rows[1:]) == sorted(
        [[a["id"], alice_id, "running", "helper_a"], [b["id"], bob_id, "running", "helper_b"]]
    )
    assert await run_cli("agents", "list", "--customer", bob_id, "--json", *common(api)) == 0
    assert [x["id"] for x in json.loads(capsys.readouterr().out)] == [b["id"]]

    assert await run_cli("agents", "stop", b["id"], *common(api)) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"agent {b['id']} of customer {bob_id} stopped: stopped by an administrator (admin:")
    assert (await api.client.get(f"/v1/agents/{b['id']}", headers=bob)).json()["status"] == "stopped"
    assert (await api.client.get(f"/v1/agents/{a['id']}", headers=alice)).json()["status"] == "running"
    assert await run_cli("agents", "list", "--customer", bob_id, *common(api)) == 0
    (row,) = capsys.readouterr().out.splitlines()[1:]
    assert row.split()[:3] == [b["id"], bob_id, "stopped"] and "(stopped by an administrator" in row
    assert [r["target"] for r in await audit(api, "agent.force_stop")] == [b["id"]]

    # a flag engaged by hand in the flag store halts alice's agent with whatever its writer typed as the reason
    kv = await api.control.jet.nc.jetstream().key_value("caravan_flags")
    await kv.put(f"killswitch.agent.{a['id']}", "\x1b[2Jgone\u202eevil".encode())
    await wait_status(api, alice, a["id"], "killed")
    assert await run_cli("agents", "list", "--customer", alice_id, *common(api)) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\u202e" not in out and "\\x1b[2Jgone\\u202eevil" in out


async def test_broadcast_is_reported_and_every_running_agent_acknowledges_it(
    api: Api, capsys: pytest.CaptureFixture[str]
) -> None:
    _, alice = await api.new_customer("alice")
    agent = await created_running(api, alice)
    heard: list[str] = []

    async def on_event(msg: nats.aio.msg.Msg) -> None:
        event = json.loads(msg.data)
        if event["kind"] == "broadcast" and event["agent_id"] == agent["id"]:
            heard.append(event["data"]["message"])

    nc = await nats.connect(api.control.settings.nats_url)
    try:
        await nc.subscribe("caravan.events.*.agent.*", cb=on_event)
        assert await run_cli("broadcast", "maintenance", "at noon", *common(api)) == 0
        assert capsys.readouterr().out.startswith("broadcast sent to every agent (1 running)")

        async def probe() -> list[str]:
            return heard

        await assert_eventually(probe, lambda h: h == ["maintenance at noon"], what="the agent acknowledged")
    finally:
        await nc.close()
    (record,) = await audit(api, "broadcast")
    assert record["details"] == {"message": "maintenance at noon", "agents": 1}


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["customers", "show", ""], "customer_id '' is not a customer id"),
        (["customers", "show", "cu-1/../../keys"], "customer_id 'cu-1/../../keys' is not a customer id"),
        (["customers", "create", " "], "customers create needs a name that is not blank"),
        (["customers", "delete", "{customer}"], "invalid choice: 'delete'"),
        (["keys"], "the following arguments are required: verb"),
        (["keys", "create", ""], "customer_id '' is not a customer id"),
        (["keys", "list", "--customer", "cu 1"], "--customer 'cu 1' is not a customer id"),
        (["keys", "revoke", ""], "prefix '' is not a key's prefix"),
        (["keys", "revoke", "../customers"], "prefix '../customers' is not a key's prefix"),
        (["agents", "stop", ""], "agent_id '' is not an agent id"),
        (["agents", "stop", "ag-1?x=1"], "agent_id 'ag-1?x=1' is not an agent id"),
        (["agents", "list", "--customer", ""], "--customer '' is not a customer id"),
        (["broadcast", " ", ""], "broadcast needs a message that is not blank"),
    ],
)
async def test_bad_input_to_the_new_verbs_is_bad_usage_and_sends_nothing(
    argv: list[str], said: str, api: Api, capsys: pytest.CaptureFixture[str]
) -> None:
    customer_id, _ = await api.new_customer()
    admin = await api.admin()
    before = [(await api.client.get(path, headers=admin)).json() for path in ("/v1/admin/audit", "/v1/admin/keys")]
    assert await run_cli(*(arg.format(customer=customer_id) for arg in argv), *common(api)) == 2
    assert said in capsys.readouterr().err
    after = [(await api.client.get(path, headers=admin)).json() for path in ("/v1/admin/audit", "/v1/admin/keys")]
    assert after == before  # not even a login (each is audited): nothing was sent


async def test_a_whole_key_given_to_revoke_is_neither_sent_nor_repeated(
    api: Api, capsys: pytest.CaptureFixture[str]
) -> None:
    customer_id, _ = await api.new_customer()
    created = (await api.client.post(f"/v1/admin/customers/{customer_id}/keys", headers=await api.admin())).json()
    assert await run_cli("keys", "revoke", created["api_key"], *common(api)) == 2
    err = capsys.readouterr().err
    secret = created["api_key"].removeprefix(created["api_key_prefix"])
    assert f"prefix '{created['api_key_prefix']}_<redacted>' is longer than a key's prefix (a whole key?)" in err
    assert secret not in err
    assert await logs_in(api, created["api_key"]) is not None
    assert await audit(api, "key.revoke") == []


async def test_what_the_api_refuses_of_the_new_verbs_is_said_with_its_error(
    api: Api, capsys: pytest.CaptureFixture[str]
) -> None:
    customer_id, _ = await api.new_customer()
    keys_before = (await api.client.get("/v1/admin/keys", headers=await api.admin())).json()
    refused = [
        (["customers", "show", "cu-000000000000"], "GET /v1/admin/customers/cu-000000000000 failed (404) not_found: "),
        (["keys", "create", "cu-000000000000"], "POST /v1/admin/customers/cu-000000000000/keys failed (404) not_found"),
        (["keys", "revoke", "cvn_00000000"], "DELETE /v1/admin/keys/cvn_00000000 failed (404) not_found: "),
        (["agents", "stop", "ag-000000000000"], "POST /v1/admin/agents/ag-000000000000/stop failed (404) not_found: "),
        (["broadcast", "two\nlines"], "POST /v1/admin/broadcast failed (422) invalid: "),
    ]
    for argv, said in refused:
        assert await run_cli(*argv, *common(api)) == 1, argv
        err = capsys.readouterr().err
        assert said in err and len(err.splitlines()) == 1, (argv, err)
    # the last admin key is not revoked: the API's 409, its code named
    (admin_key,) = [k["prefix"] for k in keys_before if k["role"] == "admin"]
    assert await run_cli("keys", "revoke", admin_key, *common(api)) == 1
    assert f"DELETE /v1/admin/keys/{admin_key} failed (409) last_admin_key: " in capsys.readouterr().err
    assert await logs_in(api, ADMIN_KEY) is not None
    assert (await api.client.get("/v1/admin/keys", headers=await api.admin())).json() == keys_before
    assert [c["id"] for c in (await api.client.get("/v1/admin/customers", headers=await api.admin())).json()] == [
        customer_id
    ]


async def test_listing_the_keys_or_agents_of_a_customer_that_does_not_exist_says_so(
    api: Api, capsys: pytest.CaptureFixture[str]
) -> None:
    # `caravan keys list --customer cu-<typo>` printed "customer cu-<typo> has no keys" and exited 0: an operator
    # read that an existing customer had no keys (or agents), where no customer has that id
    customer_id, _ = await api.new_customer()
    for verb in ("keys", "agents"):
        for extra in ([], ["--json"]):
            assert await run_cli(verb, "list", "--customer", "cu-000000000000", *extra, *common(api)) == 1
            captured = capsys.readouterr()
            said = "GET /v1/admin/customers/cu-000000000000 failed (404) not_found: customer 'cu-000000000000'"
            assert said in captured.err and captured.out == "", (verb, extra, captured)
    # a customer that is there and has none: said as before
    assert await run_cli("agents", "list", "--customer", customer_id, *common(api)) == 0
    assert capsys.readouterr().out == f"customer {customer_id} has no agents\n"
    assert await run_cli("agents", "list", "--customer", customer_id, "--json", *common(api)) == 0
    assert json.loads(capsys.readouterr().out) == []


async def test_a_customer_name_cannot_drive_the_operators_terminal(
    api: Api, capsys: pytest.CaptureFixture[str]
) -> None:
    """The API refuses a name with control or format characters (422, nothing stored); a name that holds them all
    the same (written to the store by hand) is printed with them escaped, by every verb that prints it."""
    hostile = "\x1b]0;pwned\x07\x1b[2Jacme\u202eevil"
    escaped = "\\x1b]0;pwned\\x07\\x1b[2Jacme\\u202eevil"
    assert await run_cli("customers", "create", hostile, *common(api)) == 1
    err = capsys.readouterr().err
    assert "POST /v1/admin/customers failed (422) invalid: " in err
    assert "\x1b" not in err and "\x07" not in err and "\u202e" not in err
    assert (await api.client.get("/v1/admin/customers", headers=await api.admin())).json() == []
    # a joiner the API takes (within an emoji sequence) is not printed raw either
    assert await run_cli("customers", "create", "devs \U0001f469\u200d\U0001f4bb", *common(api)) == 0
    out = capsys.readouterr().out
    assert "\u200d" not in out and "(devs \U0001f469\\u200d\U0001f4bb) created" in out

    customer_id, _ = await api.new_customer("acme")
    customers = Repo(api.control.jet.kv["customers"], Customer)
    await customers.update(customer_id, lambda c: c.model_copy(update={"name": hostile}))
    for argv in (["customers"], ["customers", "show", customer_id]):
        assert await run_cli(*argv, *common(api)) == 0
        out = capsys.readouterr().out
        assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out, argv
        assert escaped in out, argv
    assert await run_cli("customers", "show", customer_id, "--json", *common(api)) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and json.loads(out)["name"] == hostile
