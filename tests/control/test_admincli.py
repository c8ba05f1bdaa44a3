"""The `caravan customers`, `quota`, `audit` and `stats` verbs against a running gateway: what they print for a
person and with --json, what they change, and what they say (exit 2, nothing sent) when the operator's input is
wrong. The killswitch verbs are in test_cli.py."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.conftest import ADMIN_KEY, Api
from tests.control.test_cli import run_cli


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
    assert await run_cli("quota", "reset", customer_id, *common(api)) == 0
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
    assert await run_cli("audit", "--since", "0001-01-01T00:00:00+01:00", *common(api)) == 1  # no time in UTC
    assert "failed (422) invalid: invalid request: since: " in capsys.readouterr().err
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
