"""NATS's auth callout, answered by the control plane (a NATS of the operator's own, configured as
nomad/nats.nomad.hcl configures it): a login the callout cannot vouch for is refused, however it is made; a
malformed request is refused and the callout goes on; the platform's own user bypasses it; control-plane replicas
answer each login once between them; logins made at once are answered at once, each once, none held up by another's
slow read of the store, and each checked in the store whatever the callout saw before. What an agent let in may
do: tests/control/test_nats_isolation.py, whose tests run on this NATS too."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import nats
import nats.errors
import pytest

from agent.protocol import ModelConfig
from control.ids import new_id
from control.models import Agent, AgentStatus
from control.natsauth import NatsCredentials, _control_permissions, agent_permissions
from control.natscallout import (
    CALLOUT_SUBJECT,
    CalloutLogins,
    NatsCallout,
    issuer_public_key,
    jwt_permissions,
    new_issuer_seed,
)
from control.natsserver import EmbeddedNats
from control.platform import ControlPlane
from control.store import Repo
from tests.control.test_cli import run_cli
from tests.gateway.test_tasks_api import running_agent
from tests.support.nats_users import (
    CalloutUsers,
    Secured,
    Violations,
    callout_nats,
    callout_settings,
    connect_as,
)
from tests.support.nomad_nats import render_nats_users

callout_only = pytest.mark.parametrize("secured", ["callout"], indirect=True)


async def _quiet(error: Exception) -> None:
    pass


async def log_in(url: str, login: NatsCredentials) -> Any:
    return await nats.connect(
        url,
        user=login.user,
        password=login.password,
        allow_reconnect=False,
        max_reconnect_attempts=0,
        connect_timeout=5,
        error_cb=_quiet,
    )


async def refused(url: str, login: NatsCredentials) -> str:
    """How NATS refused ``login`` (it fails the test if NATS let it in)."""
    try:
        nc = await log_in(url, login)
    except (nats.errors.Error, OSError, TimeoutError) as exc:
        return str(exc) or type(exc).__name__
    await nc.close()
    raise AssertionError(f"{login.user} was let in")


def users(secured: Secured) -> CalloutUsers:
    assert isinstance(secured.auth, CalloutUsers)
    return secured.auth


@callout_only
async def test_a_login_the_callout_cannot_vouch_for_is_refused(secured: Secured) -> None:
    api, logins = secured.api, users(secured)
    _, headers = await api.new_customer()
    agent = await running_agent(api, headers)
    own = logins.agent(agent["id"])
    nc = await log_in(secured.url, own)  # its own login: let in
    await nc.close()
    stranger = CalloutLogins(new_issuer_seed())  # a seed no NATS here names
    for login in (
        NatsCredentials(own.user, "0" * 64),  # a wrong password
        NatsCredentials(own.user, own.password.upper()),  # nearly right
        stranger.agent(agent["id"]),  # derived from another seed
        logins.agent("ag-0123456789ab"),  # rightly derived, for an agent there is not
        NatsCredentials(logins.watcher().user, own.password),  # the watcher's name, the agent's password
        NatsCredentials("caravan-control", own.password),  # the platform's name: no agent's password lets it in
        NatsCredentials("", ""),
    ):
        assert "Authorization Violation" in await refused(secured.url, login), login.user
    deleted = await api.client.delete(f"/v1/agents/{agent['id']}", headers=headers)
    assert deleted.status_code in (200, 202, 204), deleted.text
    assert "Authorization Violation" in await refused(secured.url, own)  # gone: its login lets nobody in


@callout_only
async def test_an_agent_cannot_hear_other_logins(secured: Secured) -> None:
    """The server sends every login's password to the callout's subject: an agent may not listen there."""
    api = secured.api
    _, headers = await api.new_customer()
    agent = await running_agent(api, headers)
    violations = Violations()
    nc = await connect_as(secured, agent["id"], violations)
    try:
        await nc.subscribe(CALLOUT_SUBJECT)
        await nc.flush()
        await violations.seen(f'Permissions Violation for Subscription to "{CALLOUT_SUBJECT}"')
    finally:
        await nc.close()


def _jwt(claims: object) -> bytes:
    def part(value: object) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    return f"{part({'typ': 'JWT', 'alg': 'ed25519-nkey'})}.{part(claims)}.c2ln".encode()


def refusal(answer: bytes) -> bool:
    """Whether ``answer`` refuses the login: nothing (NATS: "no reason supplied"), or a response with an error."""
    if answer == b"":
        return True
    response = json.loads(base64.urlsafe_b64decode(answer.split(b".")[1] + b"=="))["nats"]
    return bool(response.get("error")) and "jwt" not in response


_REQUEST = {"type": "authorization_request", "server_id": {"id": "NSERVER"}, "user_nkey": "UUSER"}

MALFORMED = [
    b"",
    b"not a jwt",
    b"a.b.c",
    b"eyJ.\xff\xfe.sig",
    _jwt(["not", "claims"]),
    _jwt({"nats": "no object"}),
    _jwt({"nats": {**_REQUEST, "type": "user"}}),
    _jwt({"nats": {**_REQUEST, "server_id": "NSERVER"}}),
    _jwt({"nats": {**_REQUEST, "user_nkey": None}}),
    _jwt({"nats": {**_REQUEST, "connect_opts": ["user", "pass"]}}),
    _jwt({"nats": {**_REQUEST, "connect_opts": {"user": 5, "pass": "x"}}}),
    _jwt({"nats": {**_REQUEST, "server_id": {}}}),
    b"eyJ." + b"W" * 20_000 + b".sig",
    _jwt(json.loads("[" * 50 + "]" * 50)),
]


@callout_only
async def test_a_malformed_authorization_request_is_refused_and_the_callout_serves_on(secured: Secured) -> None:
    """Only the server may publish authorization requests (NATS refuses any client's publish to the subject), so
    each is put to the control plane's callout itself: none makes it raise, each is refused, and it lets the
    next right login in."""
    callout = secured.api.control.nats_callout
    assert callout is not None
    platform = await log_in(secured.url, users(secured).control())
    violations = Violations()
    platform._error_cb = violations.record
    try:
        await platform.publish(CALLOUT_SUBJECT, _jwt({"nats": _REQUEST}))  # not even the platform's own user
        await platform.flush()
        await violations.seen(f'permissions violation for publish to "{CALLOUT_SUBJECT}"')
    finally:
        await platform.close()
    for payload in MALFORMED:
        assert refusal(await callout.answer(payload)), payload[:40]
    answer = await callout.answer(_jwt({"nats": _REQUEST}))  # well formed, with no login in it
    claims = json.loads(base64.urlsafe_b64decode(answer.split(b".")[1] + b"=="))
    assert (claims["sub"], claims["aud"]) == ("UUSER", "NSERVER")
    assert claims["nats"] == {"error": "unknown user or wrong password", "type": "authorization_response", "version": 2}
    watching = await log_in(secured.url, users(secured).watcher())  # and the callout still lets the right one in
    await watching.close()


async def test_the_platform_user_bypasses_the_callout_and_nobody_else_does(tmp_path: Path) -> None:
    """With no control plane to answer, the platform's own user still logs in (it starts the control plane that
    answers); every other login waits for an answer that does not come, and is refused."""
    seed, control = callout_nats(tmp_path / "nats")
    async with EmbeddedNats(tmp_path / "nats", auth=True) as server:
        nc = await log_in(server.url, control)
        await nc.close()
        await refused(server.url, CalloutLogins(seed).watcher())


async def test_control_plane_replicas_answer_each_login_once(tmp_path: Path) -> None:
    seed, login = callout_nats(tmp_path / "nats")
    async with EmbeddedNats(tmp_path / "nats", auth=True) as server:
        first = ControlPlane(callout_settings(server.url, tmp_path / "a", seed, login))
        second = ControlPlane(callout_settings(server.url, tmp_path / "b", seed, login))
        async with first, second:
            logins = CalloutLogins(seed)
            for n in range(6):
                await refused(server.url, logins.agent(f"ag-{n:012x}"))
            watching = await log_in(server.url, logins.watcher())
            await watching.close()
            callouts = [first.nats_callout, second.nats_callout]
            for callout in callouts:
                assert callout is not None
                await callout.stop()  # once it has answered all it received
            answers = sum((c.answered for c in callouts if c is not None), start=Counter())
            assert answers == Counter({"refused": 6, "allowed": 1})


async def test_the_keys_command_makes_a_seed_whose_issuer_and_watcher_the_callout_answers_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`caravan nats-callout-keys` prints what an operator puts in the two Variables: a NATS configured with its
    issuer lets in the watcher with its password, once a control plane with its seed answers."""
    assert await run_cli("nats-callout-keys") == 0
    printed = dict(line.split("=", 1) for line in capsys.readouterr().out.splitlines())
    seed, watcher = (
        printed["CARAVAN_NATS_CALLOUT_SEED"],
        NatsCredentials("caravan-watch", printed["caravan-watch password"]),
    )
    assert printed["issuer"] == issuer_public_key(seed) and printed["issuer"].startswith("A")
    monkeypatch.setenv("CARAVAN_NATS_CALLOUT_SEED", seed)
    assert await run_cli("nats-callout-keys", "--from-env") == 0
    assert dict(line.split("=", 1) for line in capsys.readouterr().out.splitlines()) == printed  # the same again
    _, login = callout_nats(tmp_path / "nats", seed)
    async with EmbeddedNats(tmp_path / "nats", auth=True) as server:
        control = ControlPlane(callout_settings(server.url, tmp_path / "data", seed, login))
        async with control:
            watching = await log_in(server.url, watcher)
            await watching.close()


async def test_a_seed_that_is_no_account_seed_stops_the_command_without_showing_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    user_seed = "SU" + new_issuer_seed()[2:]  # (not even a valid seed: its checksum is another's)
    for bad in (user_seed, "not-a-seed-but-a-secret-all-the-same"):
        monkeypatch.setenv("CARAVAN_NATS_CALLOUT_SEED", bad)
        for argv in (["serve"], ["nats-callout-keys", "--from-env"]):
            assert await run_cli(*argv) == 2, argv
            said = capsys.readouterr().err
            assert "CARAVAN_NATS_CALLOUT_SEED" in said and "seed" in said.split(":", 2)[-1], said
            assert bad not in said and bad[2:20] not in said, said
    monkeypatch.setenv("CARAVAN_NATS_CALLOUT_SEED", new_issuer_seed())
    assert await run_cli("up") == 2  # caravan up's NATS gives agents their users itself
    assert "CARAVAN_NATS_CALLOUT_SEED is for a NATS of your own" in capsys.readouterr().err


def test_an_agents_jwt_carries_the_embedded_defaults_permissions_and_nothing_it_cannot_translate() -> None:
    permissions = agent_permissions("cu-0123456789ab", "ag-0123456789ab")
    assert jwt_permissions(permissions) == {
        "pub": {"allow": permissions["publish"]["allow"]},
        "sub": {"allow": permissions["subscribe"]["allow"]},
    }
    with pytest.raises(ValueError, match="allow_responses"):  # dropped, it would grant nothing: refused instead
        jwt_permissions({**permissions, "allow_responses": True})
    with pytest.raises(ValueError, match="max"):
        jwt_permissions({"publish": {"allow": [">"], "max": 1}})


def stored_agent(customer_id: str) -> Agent:
    agent_id = new_id("ag")
    return Agent(
        id=agent_id,
        customer_id=customer_id,
        name="stored",
        system_message="",
        model=ModelConfig(provider="openai", name="gpt-4o-mini"),
        desired="stopped",
        status=AgentStatus.STOPPED,
        job_id=f"caravan-agent-{agent_id}",
        namespace=f"caravan-{customer_id}",
    )


async def test_a_login_is_checked_in_the_store_whatever_the_callout_saw_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The callout reads a login's agent by its key once it knows the agent's customer (it saw the agent before):
    an agent another replica deleted since is refused all the same, and one it never saw is found."""
    seed, login = callout_nats(tmp_path / "nats")
    async with EmbeddedNats(tmp_path / "nats", auth=True) as server:
        control = ControlPlane(callout_settings(server.url, tmp_path / "data", seed, login))
        async with control:
            agents = Repo(control.jet.kv["agents"], Agent)
            kept, deleted = stored_agent(new_id("cu")), stored_agent(new_id("cu"))
            for agent in (kept, deleted):  # written by another replica: never seen here
                await agents.create(f"{agent.customer_id}.{agent.id}", agent)
            logins = CalloutLogins(seed)
            searched: list[str] = []  # the ids looked for among all customers' records
            find = Repo.find

            async def counted(repo: Repo[Any], record_id: str) -> Any:
                searched.append(record_id)
                return await find(repo, record_id)

            monkeypatch.setattr(Repo, "find", counted)
            for _ in range(2):  # found among all customers' records, then read by its key
                for agent in (kept, deleted):
                    nc = await log_in(server.url, logins.agent(agent.id))
                    await nc.close()
            assert searched == [kept.id, deleted.id]  # once each: the second logins read them by their keys
            await agents.delete(f"{deleted.customer_id}.{deleted.id}")  # by another replica
            assert "Authorization Violation" in await refused(server.url, logins.agent(deleted.id))
            nc = await log_in(server.url, logins.agent(kept.id))
            await nc.close()


async def test_logins_made_at_once_are_each_answered_once(tmp_path: Path) -> None:
    seed, login = callout_nats(tmp_path / "nats")
    async with EmbeddedNats(tmp_path / "nats", auth=True) as server:
        control = ControlPlane(callout_settings(server.url, tmp_path / "data", seed, login))
        async with control:
            agents = Repo(control.jet.kv["agents"], Agent)
            made = [stored_agent(new_id("cu")) for _ in range(20)]
            for agent in made:
                await agents.create(f"{agent.customer_id}.{agent.id}", agent)
            logins = CalloutLogins(seed)
            right = [logins.agent(agent.id) for agent in made]
            wrong = [NatsCredentials(c.user, c.password[::-1]) for c in right]

            async def let_in(credentials: NatsCredentials) -> str:
                nc = await log_in(server.url, credentials)
                await nc.close()
                return credentials.user

            outcomes = await asyncio.gather(*(let_in(c) for c in right), *(refused(server.url, c) for c in wrong))
            assert outcomes[:20] == [c.user for c in right]
            assert all("Authorization Violation" in said for said in outcomes[20:]), outcomes[20:]
            callout = control.nats_callout
            assert callout is not None
            await callout.stop()  # once it has answered all it received
            assert callout.answered == Counter({"allowed": 20, "refused": 20})


async def test_a_login_is_answered_while_another_waits_for_the_store(tmp_path: Path) -> None:
    """A login whose agent's record is slow to read (the store busy) does not hold up the others: the server
    refuses a login it has no answer for within its authorization timeout (2 s), as when every agent logs in again
    after a NATS restart."""
    seed, login = callout_nats(tmp_path / "nats")
    logins = CalloutLogins(seed)
    asked, answer = asyncio.Event(), asyncio.Event()

    async def slow_store(agent_id: str, customer_id: str | None = None) -> str | None:
        asked.set()
        await answer.wait()
        return "cu-0123456789ab"

    async with EmbeddedNats(tmp_path / "nats", auth=True) as server:
        nc = await log_in(server.url, login)
        callout = NatsCallout(nc, seed, slow_store)
        await callout.start()
        waiting = asyncio.create_task(refused_or_let_in(server.url, logins.agent("ag-0123456789ab")))
        try:
            await asyncio.wait_for(asked.wait(), timeout=10)
            watching = await log_in(server.url, logins.watcher())  # while the agent's record is being read
            await watching.close()
        finally:
            answer.set()
            await waiting
            await callout.stop()
            await nc.close()
        assert callout.answered == Counter({"allowed": 2})


async def test_a_login_whose_check_outlasts_the_servers_wait_is_refused_and_frees_its_place(tmp_path: Path) -> None:
    """A store that does not answer (a KV leader election, say) held each login's place among the callout's
    answers for as long as JetStream waits (15 s), though the server refuses the login after 2 s: a NATS restart
    then saw every login behind those time out too. The check is given up in time, refused, and the next login
    answered."""
    seed, login = callout_nats(tmp_path / "nats")
    logins = CalloutLogins(seed)
    asked = asyncio.Event()

    async def stuck_store(agent_id: str, customer_id: str | None = None) -> str | None:
        asked.set()
        await asyncio.Event().wait()  # never answers
        return None

    async with EmbeddedNats(tmp_path / "nats", auth=True) as server:
        nc = await log_in(server.url, login)
        callout = NatsCallout(nc, seed, stuck_store, in_flight=1, answer_within_s=0.2)
        await callout.start()
        try:
            with pytest.raises(nats.errors.Error, match="Authorization Violation"):
                await log_in(server.url, logins.agent("ag-0123456789ab"))
            assert asked.is_set()
            watching = await log_in(server.url, logins.watcher())  # the one place is free again
            await watching.close()
        finally:
            await callout.stop()
            await nc.close()
        assert callout.answered == Counter({"refused": 1, "allowed": 1})


async def refused_or_let_in(url: str, login: NatsCredentials) -> None:
    with contextlib.suppress(nats.errors.Error, OSError, TimeoutError):
        nc = await log_in(url, login)
        await nc.close()


def test_the_hcls_platform_user_has_the_embedded_defaults_permissions_exactly() -> None:
    """nomad/nats.nomad.hcl writes caravan-control's permissions by hand: each must be the embedded default's
    (control/natsauth.py), or a deny of the audit log's one missing there (a message deleted from it, say) or one
    added to natsauth but not there would pass every test that runs the HCL's NATS."""
    conf = render_nats_users({"control_password": "p", "callout_issuer": "A"})
    user = conf[conf.index('user: "caravan-control"') : conf.index("auth_callout")]

    def quoted(pattern: str) -> list[str]:
        found = re.search(pattern, user, re.DOTALL)
        assert found is not None, pattern
        return re.findall(r'"([^"]*)"', found.group(1))

    written = {
        "publish": {
            "allow": quoted(r"publish:\s*\{\s*allow:\s*\[(.*?)\]"),
            "deny": quoted(r"publish:\s*\{.*?deny:\s*\[(.*?)\]"),
        },
        "subscribe": {"allow": quoted(r"subscribe:\s*\{\s*allow:\s*\[(.*?)\]")},
    }
    assert written == _control_permissions()
