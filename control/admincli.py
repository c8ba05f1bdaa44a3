"""The ``caravan`` verbs that operate a running platform through its admin API: ``killswitch``, ``customers``
(list, show, create), ``keys`` (list, create, revoke), ``agents`` (list, stop), ``broadcast``, ``quota``, ``audit``
and ``stats``.

Each logs in with an admin key (``--api-key``, else ``CARAVAN_API_KEY``) at ``--url`` (else ``CARAVAN_URL``, else
where ``caravan up`` serves the API), prints what it did or read for a person, or the API's JSON with ``--json``
(the ``customers`` and ``keys`` verbs, ``agents list``, ``quota show``, ``audit``, ``stats``), and ends with one
line on stderr when something is wrong: exit 2 for bad usage (nothing sent), 1 for a failure (the API's error code
and message, or why it could not be reached). A new API key (``customers create``, ``keys create``) is printed
once, as the API shows it once. Whatever the API holds that came from outside (a customer's name, an audit
record's path, a flag engaged by hand in Consul) is printed with its control and format characters escaped, so
that it cannot rewrite the operator's terminal."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import httpx
from pydantic import TypeAdapter, ValidationError

from agent.backends.base import FlagKey, Scope
from agent.logsafe import printable
from agent.protocol import http_url_problem
from control.cliargs import env_port, usage
from control.ids import is_digits, is_plain_id
from control.services.audit import AuditTime
from control.services.auth import shown_prefix
from control.services.killswitch import MAX_WAIT_MS

__all__ = ["COMMANDS", "add_commands", "run_command"]

HTTP_TIMEOUT_S = 60.0
"""How long a command waits for the gateway's answer to one request."""
KEY_PREFIX_MAX = 12
"""A key's prefix (``cvn_`` and 8 hex digits) is no longer than this; every key is longer."""
UNLIMITED = "unlimited"
QUOTA_LIMITS = {  # a quota's field: what the table calls it, and the usage's field it limits
    "max_agents": ("agents", "agents"),
    "max_cpu": ("cpu (MHz)", "cpu"),
    "max_memory_mb": ("memory (MB)", "memory_mb"),
    "max_concurrent_tasks": ("tasks in flight", "concurrent_tasks"),
    "tokens_per_day": ("tokens today", "tokens_today"),
}


def shown(text: object) -> str:
    """``text`` for a terminal: each character that is not printable (controls, escapes, bidi and zero-width
    marks, line breaks) written as its Python escape."""
    return printable(str(text))


# -- arguments ------------------------------------------------------------------------------------------------


def _wait_seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 0 <= seconds <= MAX_WAIT_MS / 1000:  # NaN is neither: refused too
        raise argparse.ArgumentTypeError(f"not a number of seconds from 0 to {MAX_WAIT_MS // 1000}: {text!r}")
    return seconds


def _limit(text: str) -> int | str:
    """A quota limit: a whole number from 0, or ``unlimited``."""
    if text.strip().lower() == UNLIMITED:
        return UNLIMITED
    if not is_digits(text.strip()):
        raise argparse.ArgumentTypeError(f"not a whole number from 0, nor {UNLIMITED!r}: {text!r}")
    return int(text)


def _count(text: str) -> int:
    number = int(text) if is_digits(text.strip()) else 0
    if not 1 <= number <= 1000:
        raise argparse.ArgumentTypeError(f"not a number from 1 to 1000: {text!r}")
    return number


_AUDIT_TIME: TypeAdapter[datetime] = TypeAdapter(AuditTime)


def _time(text: str) -> str:
    """An audit bound: an ISO 8601 time with its timezone, read as the API reads it (checked here, so that nothing
    is sent for a typo, nor for a form only Python would read, ``20300101T000000Z``)."""
    try:
        _AUDIT_TIME.validate_python(text.strip())
    except ValidationError:
        raise argparse.ArgumentTypeError(
            f"not a time with its timezone, such as 2030-01-01T00:00:00Z: {text!r}"
        ) from None
    return text.strip()


def _id(value: str | None, name: str, what: str, hint: str = "") -> None:
    """An id option or argument ``name``, given empty or malformed (``--agent "$AGENT"`` with ``AGENT`` unset), is
    bad usage: never "every agent" nor a request to the API."""
    if value is not None and not is_plain_id(value):
        usage(f"{name} {value!r} is not {what} id{hint}")


def _prefix(value: str) -> None:
    """A key's prefix, as ``keys list`` shows it. A whole key given in its place is bad usage: it is neither sent
    (a path is logged) nor repeated (only its prefix, if it has one, is)."""
    if len(value) > KEY_PREFIX_MAX:
        usage(
            f"prefix {shown_prefix(value)!r} is longer than a key's prefix (a whole key?): give the prefix "
            "`caravan keys list` shows, cvn_ and 8 hex digits"
        )
    if not is_plain_id(value.replace("_", "-")):
        usage(f"prefix {value!r} is not a key's prefix (cvn_ and 8 hex digits, as `caravan keys list` shows it)")


def add_commands(sub: Any) -> None:
    """Add the admin verbs to the ``caravan`` command's subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url", help="Caravan's API (default: CARAVAN_URL, else http://127.0.0.1:$CARAVAN_HTTP_PORT, else :8080)"
    )
    common.add_argument("--api-key", default=os.environ.get("CARAVAN_API_KEY"), help="an admin key (CARAVAN_API_KEY)")
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print the API's JSON answer")
    # the same options on the verbs of `customers`, `keys`, `agents` and `quota`, which take them before the verb too
    # (`caravan customers --json`): given after the verb they count, left out they keep what was given before it
    verb_common = argparse.ArgumentParser(add_help=False)
    verb_common.add_argument("--url", default=argparse.SUPPRESS, help="Caravan's API (as before the verb)")
    verb_common.add_argument("--api-key", default=argparse.SUPPRESS, help="an admin key (as before the verb)")
    verb_json = argparse.ArgumentParser(add_help=False)
    verb_json.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print the API's JSON")

    ks = sub.add_parser(
        "killswitch", parents=[common], help="engage, release or show the killswitch (through the admin API)"
    )
    ks.add_argument("action", choices=["engage", "release", "status"])
    target = ks.add_mutually_exclusive_group()
    target.add_argument("--customer", help="scope: this customer's agents (status: what halts them)")
    target.add_argument("--agent", help="scope: this agent (status: what halts it)")
    ks.add_argument("--reason", default="", help="why (shown to agents, in status and in the audit log)")
    ks.add_argument("--hard", action="store_true", help="also stop the covered agents' jobs")
    ks.add_argument(
        "--wait",
        type=_wait_seconds,
        default=2.0,
        help=f"seconds to wait for acknowledgements (at most {MAX_WAIT_MS // 1000})",
    )

    customers = sub.add_parser(
        "customers",
        parents=[common, as_json],
        help="list, show or create customers (tenants)",
        description="Without a verb: list the customers.",
    )
    verbs = customers.add_subparsers(dest="verb")
    verbs.add_parser("list", parents=[verb_common, verb_json], help="every customer: id, created, name")
    verbs.add_parser("show", parents=[verb_common, verb_json], help="a customer, its quota and usage").add_argument(
        "customer_id"
    )
    verbs.add_parser(
        "create", parents=[verb_common, verb_json], help="a new customer and its first API key (shown once)"
    ).add_argument("name")

    keys = sub.add_parser("keys", parents=[common], help="list, create or revoke API keys (through the admin API)")
    verbs = keys.add_subparsers(dest="verb", required=True)
    listed = verbs.add_parser("list", parents=[verb_common, as_json], help="every key by its prefix (never whole)")
    listed.add_argument("--customer", help="only this customer's keys")
    verbs.add_parser(
        "create", parents=[verb_common, as_json], help="another API key for a customer (shown once)"
    ).add_argument("customer_id")
    verbs.add_parser(
        "revoke", parents=[verb_common], help="revoke a key: no more logins, and its tokens stop working within seconds"
    ).add_argument("prefix", help="the key's prefix, as `caravan keys list` shows it (cvn_ and 8 hex digits)")

    agents = sub.add_parser(
        "agents", parents=[common], help="every customer's agents; force stop one (through the admin API)"
    )
    verbs = agents.add_subparsers(dest="verb", required=True)
    listed = verbs.add_parser("list", parents=[verb_common, as_json], help="every customer's agents and their status")
    listed.add_argument("--customer", help="only this customer's agents")
    verbs.add_parser(
        "stop", parents=[verb_common], help="stop any customer's agent (its owner can start it again)"
    ).add_argument("agent_id")

    broadcast = sub.add_parser(
        "broadcast",
        parents=[common],
        help="send a one-line message to every agent (each writes it to its log and acknowledges it)",
    )
    broadcast.add_argument("message", nargs="+", help="the message (words given apart are joined by a space)")

    quota = sub.add_parser(
        "quota", parents=[common], help="show, change or reset a customer's quota (through the admin API)"
    )
    verbs = quota.add_subparsers(dest="verb", required=True)
    verbs.add_parser("show", parents=[verb_common, as_json], help="a customer's quota and usage").add_argument(
        "customer_id"
    )
    change = verbs.add_parser(
        "set",
        parents=[verb_common],
        help="change the limits given, keep the others (one atomic change)",
        description="Change the limits given and keep the others; a limit is a whole number or 'unlimited'.",
    )
    change.add_argument("customer_id")
    change.add_argument("--tier", choices=["free", "standard", "enterprise"], help="the API's rate-limit tier")
    for field, (shown_as, _) in QUOTA_LIMITS.items():
        change.add_argument(
            f"--{field.replace('_', '-')}", dest=field, type=_limit, metavar="N|unlimited", help=f"limit of {shown_as}"
        )
    verbs.add_parser("reset", parents=[verb_common], help="back to a new customer's default quota").add_argument(
        "customer_id"
    )

    audit = sub.add_parser("audit", parents=[common, as_json], help="read the audit log, oldest first")
    audit.add_argument(
        "--actor", help="who: an admin by its key's prefix (cvn_1a2b3c4d, or admin:cvn_1a2b3c4d), system:token-budget"
    )
    audit.add_argument("--action", help="what: killswitch.engage, quota.set, auth.forbidden, ...")
    audit.add_argument("--customer", help="the customer it concerned")
    audit.add_argument("--since", type=_time, help="from this time, with a timezone: 2030-01-01T00:00:00Z")
    audit.add_argument("--until", type=_time, help="to this time, with a timezone")
    audit.add_argument("--limit", type=_count, default=100, help="the newest N that match (1-1000, default 100)")

    sub.add_parser("stats", parents=[common, as_json], help="agents and tasks by status, tokens, allocations")


# -- talking to the API ---------------------------------------------------------------------------------------


def _api_url(url: str) -> str:
    """``--url`` (``CARAVAN_URL``) as given, if an HTTP client can connect to it; bad usage otherwise (httpx took
    ``not a url`` and failed only when it sent the request: "cannot reach")."""
    problem = http_url_problem(url)
    if problem is None:
        try:
            httpx.URL(url)
        except httpx.InvalidURL as exc:
            problem = f"is not a URL: {exc}"
    if problem is not None:
        usage(f"--url {url!r} {problem} (the API's, as `caravan up` serves it: http://127.0.0.1:8080)")
    return url


@contextlib.contextmanager
def _admin(args: argparse.Namespace) -> Iterator[httpx.Client]:
    """A client logged in with ``--api-key`` at ``--url``; what goes wrong on the way to the API ends the
    command with a line saying what to check."""
    if not args.api_key:
        usage("an admin API key is needed: --api-key or CARAVAN_API_KEY")
    if args.url is None:  # where `caravan up` (./dev/up) serves it
        args.url = os.environ.get("CARAVAN_URL") or f"http://127.0.0.1:{env_port('CARAVAN_HTTP_PORT', 8080)}"
    client = httpx.Client(base_url=_api_url(args.url), timeout=HTTP_TIMEOUT_S)
    with contextlib.closing(client):
        try:
            issued = _answer(client.post("/v1/auth/token", json={"api_key": args.api_key}))
            if not isinstance(issued, dict) or not isinstance(issued.get("access_token"), str):
                raise SystemExit(
                    f"caravan: {args.url} answered POST /v1/auth/token without an access_token: is --url "
                    "(CARAVAN_URL) Caravan's API?"
                )
            client.headers["Authorization"] = f"Bearer {issued['access_token']}"
            yield client
        except httpx.TimeoutException:
            raise SystemExit(
                f"caravan: {args.url} did not answer within {HTTP_TIMEOUT_S:g} s: is the platform up, and is --url "
                "(CARAVAN_URL) right?"
            ) from None
        except httpx.HTTPError as exc:
            raise SystemExit(
                f"caravan: cannot reach {args.url} ({str(exc) or type(exc).__name__}): is the platform running, and "
                "is --url (CARAVAN_URL) right?"
            ) from None


def _answer(response: httpx.Response) -> Any:
    """The JSON of a successful answer; an error answer (``{"error": {"code", "message"}}``) ends the command with
    its message."""
    request = f"{response.request.method} {response.request.url.path}"
    if response.status_code >= 400:
        try:
            error = response.json()["error"]
            message = f"{error['code']}: {error['message']}"
        except (ValueError, KeyError, TypeError):
            message = " ".join(response.text.split())[:500]
        raise SystemExit(f"caravan: {shown(request)} failed ({response.status_code}) {shown(message)}")
    if response.status_code == 204:
        return None
    try:
        return response.json()
    except ValueError:
        raise SystemExit(
            f"caravan: {request} answered {response.status_code} without JSON: is --url (CARAVAN_URL) Caravan's API?"
        ) from None


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))  # escapes every control character; non-ASCII as \\u escapes too


def run_command(args: argparse.Namespace) -> None:
    """Carry out one of :data:`COMMANDS`."""
    if args.command == "killswitch":
        hint = " (leave out --customer and --agent to cover every agent)"
        _id(args.customer, "--customer", "a customer", hint)
        _id(args.agent, "--agent", "an agent", hint)
        if args.action == "engage" and not args.reason.strip():
            usage("killswitch engage needs --reason: it is shown to agents, in status and in the audit log")
    elif args.command == "audit":
        _id(args.customer, "--customer", "a customer")
    elif args.command == "customers":
        if args.verb == "show":
            _id(args.customer_id, "customer_id", "a customer")
        if args.verb == "create" and not args.name.strip():
            usage("customers create needs a name that is not blank")
    elif args.command in ("keys", "agents"):
        _id(getattr(args, "customer", None), "--customer", "a customer")
        _id(getattr(args, "customer_id", None), "customer_id", "a customer")
        _id(getattr(args, "agent_id", None), "agent_id", "an agent")
        if args.verb == "revoke":
            _prefix(args.prefix)
    elif args.command == "broadcast":
        args.message = " ".join(args.message)
        if not args.message.strip():
            usage("broadcast needs a message that is not blank: every agent writes it to its log")
    elif args.command == "quota":
        _id(args.customer_id, "customer_id", "a customer")
        if args.verb == "set" and args.tier is None and all(getattr(args, f) is None for f in QUOTA_LIMITS):
            options = ", ".join(f"--{f.replace('_', '-')}" for f in ("tier", *QUOTA_LIMITS))
            usage(f"nothing to change: give at least one of {options}")
    with _admin(args) as client:
        _VERBS[args.command](client, args)


# -- the verbs ------------------------------------------------------------------------------------------------


def _killswitch(client: httpx.Client, args: argparse.Namespace) -> None:
    if args.action == "status":
        params = {"customer_id": args.customer} if args.customer else {"agent_id": args.agent} if args.agent else {}
        flags = _answer(client.get("/v1/admin/killswitch", params=params))
        if not flags:
            whom = f"customer {args.customer}'s agents" if args.customer else f"agent {args.agent}"
            print(f"no killswitch halts {whom}" if params else "no killswitch engaged")
        for flag in flags:
            target, by, reason = shown(flag["target"] or "every agent"), shown(flag["by"]), shown(flag["reason"])
            kind = "hard" if flag.get("hard") else "soft"  # hard: the jobs stopped, their owners cannot start them
            print(f"ENGAGED {flag['scope']:<8} {target:<16} {kind} by {by} at {flag['at']}: {reason}")
        return
    scope = "agent" if args.agent else "customer" if args.customer else "all"
    body = {
        "scope": scope,
        "customer_id": args.customer,
        "agent_id": args.agent,
        "engaged": args.action == "engage",
        "reason": args.reason,
        "wait_ms": int(args.wait * 1000),
    }
    if args.hard:
        body["hard"] = True
    result = _answer(client.post("/v1/admin/killswitch", json={k: v for k, v in body.items() if v is not None}))
    verb = "engaged" if result["engaged"] else "released"
    where = FlagKey(Scope(result["scope"]), result["target"]).label
    if result.get("nothing_to_release"):
        print(f"killswitch was not engaged ({where}): nothing to release")
        return
    print(
        f"killswitch {verb} ({where}) in {result['elapsed_ms']:.0f} ms: "
        f"{result['acknowledged']}/{result['covered']} agents acknowledged"
    )
    if result["unacknowledged"]:
        print("not acknowledged: " + ", ".join(result["unacknowledged"]))
    if result["stopped"]:
        print("jobs stopped: " + ", ".join(result["stopped"]))
    if result["unacknowledged"]:
        sys.exit(1)


def _customers(client: httpx.Client, args: argparse.Namespace) -> None:
    if args.verb == "create":
        created = _answer(client.post("/v1/admin/customers", json={"name": args.name}))
        _print_new_key(
            created, args, f"customer {created['id']} ({shown(created['name'])}) created, with its first API key:"
        )
        return
    if args.verb == "show":
        customer = _answer(client.get(f"/v1/admin/customers/{args.customer_id}"))
        if args.json:
            _print_json(customer)
            return
        print(f"customer {customer['id']} ({shown(customer['name'])}), created {customer['created_at']}")
        _print_usage(customer["usage"])
        return
    customers = _answer(client.get("/v1/admin/customers"))
    if args.json:
        _print_json(customers)
        return
    if not customers:
        print("no customers")
        return
    print(f"{'ID':<16}  {'CREATED':<27}  NAME")
    for customer in customers:
        print(f"{customer['id']:<16}  {customer['created_at']:<27}  {shown(customer['name'])}")


def _print_new_key(created: dict[str, Any], args: argparse.Namespace, title: str) -> None:
    """A new key, as JSON (``--json``) or on a line of its own under ``title``, said to be shown once."""
    if args.json:
        _print_json(created)
        return
    print(title)
    print(f"  {shown(created['api_key'])}")
    prefix = shown(created["api_key_prefix"])
    print(f"This key will not be shown again: keep it now. It is listed and revoked by its prefix, {prefix}.")


def _listed(
    client: httpx.Client, what: str, args: argparse.Namespace, header: str, row: Callable[[dict[str, Any]], str]
) -> None:
    """``GET /v1/admin/<what>`` (of ``--customer``, if given) printed as JSON (``--json``), or as a table: its
    ``header``, then a ``row`` for each; that there are none, if so. The API lists none for a customer that does
    not exist, which is then the customer's 404 (a typo is not "has no keys")."""
    listed = _answer(client.get(f"/v1/admin/{what}", params={"customer_id": args.customer} if args.customer else {}))
    if not listed and args.customer:
        _answer(client.get(f"/v1/admin/customers/{args.customer}"))
    if args.json:
        _print_json(listed)
    elif not listed:
        print(f"customer {args.customer} has no {what}" if args.customer else f"no {what}")
    else:
        print(header)
        for each in listed:
            print(row(each))


def _keys(client: httpx.Client, args: argparse.Namespace) -> None:
    if args.verb == "create":
        created = _answer(client.post(f"/v1/admin/customers/{args.customer_id}/keys"))
        _print_new_key(created, args, f"new API key of customer {args.customer_id}:")
        return
    if args.verb == "revoke":
        _answer(client.delete(f"/v1/admin/keys/{args.prefix}"))
        print(f"key {args.prefix} revoked: it logs in no more, and its tokens stop working within seconds")
        return
    _listed(
        client,
        "keys",
        args,
        f"{'PREFIX':<12}  {'ROLE':<8}  {'CUSTOMER':<16}  {'CREATED':<27}  REVOKED",
        lambda key: (
            f"{shown(key['prefix']):<12}  {key['role']:<8}  {shown(key['customer_id'] or '-'):<16}  "
            f"{key['created_at']:<27}  {key['revoked_at'] or '-'}"
        ),
    )


def _agents(client: httpx.Client, args: argparse.Namespace) -> None:
    if args.verb == "stop":
        agent = _answer(client.post(f"/v1/admin/agents/{args.agent_id}/stop"))
        reason = f": {shown(agent['status_reason'])}" if agent["status_reason"] else ""
        print(f"agent {agent['id']} of customer {agent['customer_id']} {agent['status']}{reason}")
        return

    def row(agent: dict[str, Any]) -> str:
        reason = f"  ({shown(agent['status_reason'])})" if agent["status_reason"] else ""
        return f"{agent['id']:<16}  {agent['customer_id']:<16}  {agent['status']:<8}  {shown(agent['name'])}{reason}"

    _listed(client, "agents", args, f"{'ID':<16}  {'CUSTOMER':<16}  {'STATUS':<8}  NAME", row)


def _broadcast(client: httpx.Client, args: argparse.Namespace) -> None:
    result = _answer(client.post("/v1/admin/broadcast", json={"message": args.message}))
    print(
        f"broadcast sent to every agent ({result['agents_running']} running): each writes it to its log and "
        "acknowledges it with a broadcast event"
    )


def _quota(client: httpx.Client, args: argparse.Namespace) -> None:
    path = f"/v1/admin/customers/{args.customer_id}"
    if args.verb == "show":
        customer = _answer(client.get(path))
        if args.json:
            _print_json(customer["usage"])
            return
        print(f"customer {customer['id']} ({shown(customer['name'])})")
        _print_usage(customer["usage"])
        return
    if args.verb == "reset":
        used = _answer(client.put(f"{path}/quota", json={}))
        print(f"quota of {args.customer_id} reset to a new customer's default")
    else:
        changes: dict[str, Any] = {} if args.tier is None else {"tier": args.tier}
        for field in QUOTA_LIMITS:
            value = getattr(args, field)
            if value is not None:
                changes[field] = None if value == UNLIMITED else value
        used = _answer(client.patch(f"{path}/quota", json=changes))
        print(f"quota of {args.customer_id} changed: " + ", ".join(f"{k} {_limit_text(v)}" for k, v in changes.items()))
    _print_usage(used)


def _limit_text(value: object) -> str:
    return UNLIMITED if value is None else str(value)


def _print_usage(used: dict[str, Any]) -> None:
    quota = used["quota"]
    print(f"  {'tier':<16} {quota['tier']}")
    print(f"  {'':<16} {'LIMIT':>12} {'USED':>12}")
    for field, (name, used_field) in QUOTA_LIMITS.items():
        print(f"  {name:<16} {_limit_text(quota[field]):>12} {used[used_field]:>12}")


def _audit(client: httpx.Client, args: argparse.Namespace) -> None:
    query = {
        "actor": args.actor,  # (an admin's key prefix alone names it: the API takes it so)
        "action": args.action,
        "customer_id": args.customer,
        "since": args.since,
        "until": args.until,
        "limit": args.limit,
    }
    records = _answer(client.get("/v1/admin/audit", params={k: v for k, v in query.items() if v is not None}))
    if args.json:
        _print_json(records)
        return
    if not records:
        print("no audit records match")
    for record in records:
        about = " ".join(
            f"{name}={shown(record[name])}"
            for name in ("customer_id", "target")
            if record.get(name) is not None and (name == "customer_id" or record["target"] != record["customer_id"])
        )
        details = json.dumps(record["details"], separators=(",", ":")) if record["details"] else ""
        line = f"{record['at']}  {record['result']:<6}  {shown(record['actor'])} ({record['role']})  {record['action']}"
        print("  ".join(part for part in (line, about, details) if part))


def _stats(client: httpx.Client, args: argparse.Namespace) -> None:
    stats = _answer(client.get("/v1/admin/stats"))
    if args.json:
        _print_json(stats)
        return

    def counts(by_status: dict[str, int]) -> str:
        return ", ".join(f"{status} {n}" for status, n in sorted(by_status.items())) or "none"

    print(f"customers    {stats['customers']}")
    print(f"agents       {counts(stats['agents_by_status'])}")
    print(f"tasks        {counts(stats['tasks_by_status'])}  (ended ones as counted at {stats['ended_counted_at']})")
    tokens = {customer: n for customer, n in stats["tokens_today"].items() if n}
    print("tokens today " + (", ".join(f"{c} {n}" for c, n in sorted(tokens.items())) or "none"))
    allocations = stats["allocations"]
    if not allocations:
        print("allocations  none reported")
        return
    print(f"{'AGENT':<16}  {'CUSTOMER':<16}  {'ALLOCATION':<36}  {'CPU %':>6}  {'RSS MB':>8}")
    for alloc in allocations:
        print(
            f"{alloc['agent_id']:<16}  {alloc['customer_id']:<16}  {shown(alloc['alloc_id']):<36}  "
            f"{alloc['cpu_percent']:>6.1f}  {alloc['memory_rss_mb']:>8.1f}"
        )


_VERBS: dict[str, Callable[[httpx.Client, argparse.Namespace], None]] = {
    "killswitch": _killswitch,
    "customers": _customers,
    "keys": _keys,
    "agents": _agents,
    "broadcast": _broadcast,
    "quota": _quota,
    "audit": _audit,
    "stats": _stats,
}
COMMANDS = tuple(_VERBS)
"""The ``caravan`` verbs this module carries out."""
