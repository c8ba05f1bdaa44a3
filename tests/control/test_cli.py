"""The `caravan killswitch` verbs against a running gateway, what `caravan up` gives the demo customer, and what
the CLI says (rather than a traceback) when an argument, the environment, NATS, Nomad or the gateway is wrong."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from nats.aio.client import Client as NATS
from nats.aio.client import ServerVersion

from control import admincli, cli
from control.cli import _banner, _data_dir, _demo_credentials, _demo_model, main
from control.natsauth import NatsAuth
from control.natsserver import EmbeddedNats
from control.platform import ControlPlane
from control.settings import Settings
from tests.conftest import ADMIN_KEY, Api, make_settings, serve_api
from tests.gateway.teams_support import task_status
from tests.gateway.test_tasks_api import TOOL_SCRIPT, running_agent
from tests.support.helpers import free_port

PROVIDER_KEYS = ("OPENAI_API_KEY", "OPENROUTER_API_KEY", "GROQ_API_KEY", "DEEPSEEK_API_KEY", "ANTHROPIC_API_KEY")


async def run_cli(*argv: str) -> int:
    """``caravan argv...`` in this process: its exit code, a message it exits with printed on stderr (as the
    interpreter does). Any other exception is raised: the operator would see a traceback."""

    def call() -> int:
        try:
            main(list(argv))
        except SystemExit as exc:
            if exc.code is None or isinstance(exc.code, int):
                return exc.code or 0
            print(exc.code, file=sys.stderr)
            return 1
        return 0

    return await asyncio.to_thread(call)


async def test_killswitch_engage_status_release(api: Api, capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--url", api.base, "--api-key", ADMIN_KEY]
    assert await run_cli("killswitch", "engage", "--reason", "drill", *common) == 0
    assert "killswitch engaged (all) in " in capsys.readouterr().out
    assert await run_cli("killswitch", "status", *common) == 0
    status = capsys.readouterr().out
    assert "ENGAGED all" in status and " soft by admin:" in status and "drill" in status
    assert await run_cli("killswitch", "release", *common) == 0
    assert "killswitch released (all) in " in capsys.readouterr().out
    assert await run_cli("killswitch", "status", *common) == 0
    assert "no killswitch engaged" in capsys.readouterr().out


async def test_killswitch_status_of_a_customer_or_agent_shows_what_halts_it(
    api: Api, capsys: pytest.CaptureFixture[str]
) -> None:
    """`status --customer` / `--agent` shows only the flags that halt them (it listed every flag)."""
    admin = await api.admin()
    (alice, alice_headers), (bob, bob_headers) = await api.new_customer(), await api.new_customer()
    alices = await api.client.post("/v1/agents", json={"name": "a", "model": TOOL_SCRIPT}, headers=alice_headers)
    bobs = await api.client.post("/v1/agents", json={"name": "b", "model": TOOL_SCRIPT}, headers=bob_headers)
    agent_a, agent_b = alices.json()["id"], bobs.json()["id"]
    common = ["--url", api.base, "--api-key", ADMIN_KEY]
    assert await run_cli("killswitch", "status", "--customer", alice, *common) == 0
    assert capsys.readouterr().out == f"no killswitch halts customer {alice}'s agents\n"
    for scope, target in (("agent", agent_b), ("customer", alice), ("agent", agent_a)):
        body = {"scope": scope, f"{scope}_id": target, "reason": f"on {target}", "wait_ms": 0}
        assert (await api.client.post("/v1/admin/killswitch", json=body, headers=admin)).status_code == 200

    async def shown(*target: str) -> list[str]:
        assert await run_cli("killswitch", "status", *target, *common) == 0
        return [line.split(": ", 1)[1] for line in capsys.readouterr().out.splitlines()]

    assert await shown("--customer", alice) == sorted([f"on {alice}", f"on {agent_a}"])
    assert await shown("--agent", agent_b) == [f"on {agent_b}"]
    assert await shown("--customer", bob) == [f"on {agent_b}"]
    assert await shown() == sorted([f"on {alice}", f"on {agent_a}", f"on {agent_b}"])
    assert await run_cli("killswitch", "status", "--agent", "ag-000000000000", *common) == 1
    assert "(404) not_found: agent 'ag-000000000000' not found" in capsys.readouterr().err
    both = {"customer_id": alice, "agent_id": agent_a}
    response = await api.client.get("/v1/admin/killswitch", params=both, headers=admin)
    assert response.status_code == 422 and "not both" in response.json()["error"]["message"]


async def test_releasing_what_is_not_engaged_says_so_and_succeeds(api: Api, capsys: pytest.CaptureFixture[str]) -> None:
    customer_id, headers = await api.new_customer()
    await running_agent(api, headers)  # running, yet with nothing to acknowledge
    common = ["--url", api.base, "--api-key", ADMIN_KEY]
    assert await run_cli("killswitch", "release", "--customer", customer_id, *common) == 0
    assert capsys.readouterr().out == f"killswitch was not engaged (customer {customer_id}): nothing to release\n"


async def test_killswitch_finds_the_api_where_caravan_up_serves_it(
    api: Api, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --url: CARAVAN_URL, else the port `./dev/up` was given (CARAVAN_HTTP_PORT)."""
    monkeypatch.setenv("CARAVAN_API_KEY", ADMIN_KEY)
    monkeypatch.delenv("CARAVAN_URL", raising=False)
    monkeypatch.setenv("CARAVAN_HTTP_PORT", str(urlsplit(api.base).port))
    assert await run_cli("killswitch", "status") == 0
    assert "no killswitch engaged" in capsys.readouterr().out
    monkeypatch.setenv("CARAVAN_URL", api.base)
    monkeypatch.setenv("CARAVAN_HTTP_PORT", str(free_port()))  # CARAVAN_URL comes first
    assert await run_cli("killswitch", "status") == 0
    assert "no killswitch engaged" in capsys.readouterr().out
    monkeypatch.delenv("CARAVAN_URL")
    monkeypatch.setenv("CARAVAN_HTTP_PORT", "abc")
    assert await run_cli("killswitch", "status") == 2
    assert "CARAVAN_HTTP_PORT" in capsys.readouterr().err


async def test_killswitch_cli_explains_failures(api: Api, capsys: pytest.CaptureFixture[str]) -> None:
    why = ("--reason", "test")
    assert await run_cli("killswitch", "engage", *why, "--url", api.base, "--api-key", "wrong-key-0123456789") == 1
    assert "(401) unauthorized: " in capsys.readouterr().err
    assert (
        await run_cli(
            "killswitch", "engage", *why, "--customer", "cu-000000000000", "--url", api.base, "--api-key", ADMIN_KEY
        )
        == 1
    )
    assert "(404) not_found: " in capsys.readouterr().err
    # no reason: bad usage, nothing sent (it engaged every agent with an empty reason)
    assert await run_cli("killswitch", "engage", "--url", api.base, "--api-key", ADMIN_KEY) == 2
    assert "killswitch engage needs --reason" in capsys.readouterr().err
    assert (await api.client.get("/v1/admin/killswitch", headers=await api.admin())).json() == []


@pytest.mark.parametrize(
    ("action", "target"),
    [("engage", "--agent"), ("engage", "--customer"), ("release", "--customer"), ("release", "--agent")],
)
@pytest.mark.parametrize("empty", ["", "  "])
async def test_an_empty_target_is_bad_usage_not_every_agent(
    action: str, target: str, empty: str, api: Api, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--agent "$AGENT"` with AGENT unset: neither halts nor releases the whole platform."""
    admin = await api.admin()
    engaged = {"scope": "all", "reason": "incident", "wait_ms": 0}
    assert (await api.client.post("/v1/admin/killswitch", json=engaged, headers=admin)).status_code == 200
    before = (await api.client.get("/v1/admin/killswitch", headers=admin)).json()
    common = ["--reason", "scripted", "--url", api.base, "--api-key", ADMIN_KEY]
    assert await run_cli("killswitch", action, target, empty, *common) == 2
    assert f"caravan: {target} {empty!r} is not a" in capsys.readouterr().err
    assert (await api.client.get("/v1/admin/killswitch", headers=admin)).json() == before
    records = (await api.client.get("/v1/admin/audit", params={"action": "killswitch.engage"}, headers=admin)).json()
    assert len(records) == 1  # the test's own: the CLI sent nothing


DEAD_URL = f"http://127.0.0.1:{free_port()}"  # nothing listens there


@pytest.mark.parametrize(
    ("argv", "env", "named"),
    [
        (["killswitch", "engage", "--wait", "nan", "--url", DEAD_URL], {}, "--wait"),
        (["killswitch", "engage", "--wait", "inf", "--url", DEAD_URL], {}, "--wait"),
        (["killswitch", "engage", "--wait", "-1", "--url", DEAD_URL], {}, "--wait"),
        (["killswitch", "engage", "--wait", "31", "--url", DEAD_URL], {}, "--wait"),  # the API waits 30 s at most
        (["killswitch", "status", "--url", "http://[::1"], {}, "--url"),
        (["killswitch", "status", "--url", "not a url"], {}, "--url 'not a url'"),
        (["killswitch", "status", "--url", "127.0.0.1:8080"], {}, "--url '127.0.0.1:8080'"),  # no scheme
        (["killswitch", "status", "--url", "ftp://127.0.0.1"], {}, "--url"),
        (["killswitch", "status", "--url", "http://"], {}, "--url"),
        (["killswitch", "status", "--url", "http://127.0.0.1:99999"], {}, "--url"),
        (["killswitch", "status"], {"CARAVAN_URL": "localhost"}, "--url 'localhost'"),
        (["up", "--nats-port", "70000"], {}, "--nats-port"),
        (["up"], {"CARAVAN_NATS_PORT": "abc"}, "CARAVAN_NATS_PORT"),
        (["up"], {"CARAVAN_NATS_PORT": "4²"}, "CARAVAN_NATS_PORT"),  # a digit to str.isdigit, not to int()
        (["up"], {"CARAVAN_HTTP_PORT": "99999"}, "CARAVAN_HTTP_PORT"),
        (["job", "render", "ag-000000000000"], {"CARAVAN_HTTP_PORT": "abc"}, "CARAVAN_HTTP_PORT='abc'"),
        (["job", "render", "ag-000000000000"], {"CARAVAN_SCHEDULER": "mesos"}, "CARAVAN_SCHEDULER='mesos'"),
        (["serve"], {"CARAVAN_DATACENTERS": "dc1"}, "CARAVAN_DATACENTERS='dc1'"),  # a list is JSON
        (["serve"], {"NOMAD_SKIP_VERIFY": "maybe"}, "NOMAD_SKIP_VERIFY='maybe'"),  # named as the operator set it
        (["serve"], {"CARAVAN_SPIN_US": "-1"}, "CARAVAN_SPIN_US='-1'"),
        (["serve"], {"CARAVAN_AGENT_RESTART_INTERVAL_S": "2"}, "CARAVAN_AGENT_RESTART_INTERVAL_S='2'"),  # Nomad: 5 s
        (  # Nomad refuses a restart policy whose attempts cannot fit in its interval
            ["serve"],
            {"CARAVAN_AGENT_RESTART_ATTEMPTS": "100", "CARAVAN_AGENT_RESTART_DELAY_S": "5"},
            "100 restarts 5 s apart do not fit in 300 s",
        ),
    ],
)
async def test_a_bad_argument_or_environment_value_is_named_as_bad_usage(
    argv: list[str],
    env: dict[str, str],
    named: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)  # the default data dir, should anything get that far
    monkeypatch.setenv("CARAVAN_API_KEY", ADMIN_KEY)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert await run_cli(*argv) == 2
    assert named in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["job", "render", "ag-000000000000"], ["serve"]])
async def test_nats_down_is_said_once(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dead = f"nats://127.0.0.1:{free_port()}"
    monkeypatch.setenv("NATS_URL", dead)
    monkeypatch.setenv("CARAVAN_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("CARAVAN_HTTP_PORT", str(free_port()))
    assert await run_cli(*argv) == 1
    assert f"cannot reach NATS at {dead}" in capsys.readouterr().err


async def test_a_nats_server_too_old_is_named_with_the_version_needed(
    nats_server: EmbeddedNats,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """nats-server 2.10 (what nomad/nats.nomad.hcl ran) refused the control plane's start halfway, with a traceback
    ending in JetStream's "stream configuration update can not change MaxConsumers", for a NATS of 2.11's."""
    monkeypatch.setattr(NATS, "connected_server_version", property(lambda _nc: ServerVersion("2.10.26")))
    monkeypatch.setenv("NATS_URL", nats_server.url)
    monkeypatch.setenv("CARAVAN_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("CARAVAN_HTTP_PORT", str(free_port()))
    assert await run_cli("serve") == 1
    said = capsys.readouterr().err
    assert "NATS runs nats-server 2.10.26: Caravan needs nats-server 2.11 or later" in said, said
    assert "Traceback" not in said and "reconnecting" not in said, said


@pytest.mark.parametrize("login", [{}, {"CARAVAN_NATS_USER": "caravan-control", "CARAVAN_NATS_PASSWORD": "wrong"}])
@pytest.mark.parametrize("argv", [["job", "render", "ag-000000000000"], ["serve"]])
async def test_a_login_nats_refuses_is_said_as_such(
    argv: list[str],
    login: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A NATS that requires users (as `caravan up` runs it), reached without them or with a wrong password: it
    answered, so "cannot reach" would send the operator looking for a server that is there."""
    NatsAuth(tmp_path / "nats")
    async with EmbeddedNats(tmp_path / "nats", auth=True) as server:
        monkeypatch.setenv("NATS_URL", server.url)
        monkeypatch.setenv("CARAVAN_DATA_DIR", str(tmp_path / "elsewhere"))  # not the data dir of its `caravan up`
        monkeypatch.setenv("CARAVAN_HTTP_PORT", str(free_port()))
        for name, value in login.items():
            monkeypatch.setenv(name, value)
        assert await run_cli(*argv) == 1
    err = capsys.readouterr().err
    assert f"NATS at {server.url} refused the login" in err and "cannot reach" not in err, err
    # `caravan job` reads the login of the `caravan up` whose data dir it is given; `caravan serve` takes its own
    assert ("CARAVAN_DATA_DIR" in err) == (argv[0] == "job"), err


@pytest.fixture
def on_nats(nats_server: EmbeddedNats, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The CLI's environment: the test's NATS, and a data dir of its own."""
    monkeypatch.setenv("NATS_URL", nats_server.url)
    monkeypatch.setenv("CARAVAN_DATA_DIR", str(tmp_path))


async def test_job_render_on_a_nats_caravan_never_ran_on(
    on_nats: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await run_cli("job", "render", "ag-000000000000") == 1
    assert "has no caravan_agents bucket" in capsys.readouterr().err


async def test_serve_says_its_port_is_taken(
    on_nats: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        monkeypatch.setenv("CARAVAN_HTTP_PORT", str(taken.getsockname()[1]))
        assert await run_cli("serve") == 1
    assert "is in use: set CARAVAN_HTTP_PORT" in capsys.readouterr().err


async def test_serve_says_nomad_is_unreachable(
    on_nats: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setenv("CARAVAN_HTTP_PORT", str(free_port()))
    monkeypatch.setenv("CARAVAN_SCHEDULER", "nomad")
    monkeypatch.setenv("CARAVAN_DATA_DIR", str(tmp_path / "var"))
    nomad = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("NOMAD_ADDR", nomad)
    assert await run_cli("serve") == 1
    assert f"cannot reach Nomad at {nomad}" in capsys.readouterr().err
    assert stat.S_IMODE((tmp_path / "var").stat().st_mode) == 0o700  # the data dir it made: its own alone


@pytest.mark.parametrize("users", [False, True], ids=["a NATS of its own", "the NATS of the caravan up"])
async def test_serve_on_the_local_scheduler_refuses_the_data_dir_another_caravan_runs_on(
    users: bool, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """The local scheduler runs agents under the data dir: a second control plane on it would run a second set.
    Said first, also where the NATS is the one the `caravan up` holding the data dir runs, with users of its own
    (this login would be refused: the data dir is the problem, not the login)."""
    if users:
        NatsAuth(tmp_path / "nats")
    async with EmbeddedNats(tmp_path / "nats", auth=users) as server:
        monkeypatch.setenv("NATS_URL", server.url)
        monkeypatch.setenv("CARAVAN_DATA_DIR", str(tmp_path))
        monkeypatch.setenv("CARAVAN_HTTP_PORT", str(free_port()))
        with _data_dir(Settings(data_dir=tmp_path), hold=True):  # as a `caravan up` on it holds it
            assert await run_cli("serve") == 1
    said = capsys.readouterr().err
    assert f"data dir {tmp_path} is in use by another caravan (pid {os.getpid()})" in said, said


@contextlib.asynccontextmanager
async def gateway_that(fails: str) -> AsyncIterator[str]:
    """A gateway that gives a token, then fails the next request: it goes down (closes the connection without an
    answer) or never answers; or a web server that is no gateway at all (a page for every request, or JSON)."""
    page = b"<html>not here</html>"
    json_page = b'{"status": "ok"}'

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.closing(writer):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"content-length: *(\d+)", head, re.IGNORECASE)
                await reader.readexactly(int(length.group(1)) if length else 0)
                if fails == "no gateway":
                    writer.write(
                        b"HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: %d\r\n\r\n%s"
                        % (len(page), page)
                    )
                elif fails == "json, no gateway":
                    writer.write(
                        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                        % (len(json_page), json_page)
                    )
                elif head.startswith(b"POST /v1/auth/token "):
                    token = b'{"access_token": "t", "token_type": "bearer", "expires_in": 3600}'
                    writer.write(
                        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                        % (len(token), token)
                    )
                elif fails == "down":
                    return
                else:
                    await reader.read()  # until the CLI gives up and hangs up
                    return
                await writer.drain()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with server:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


@pytest.mark.parametrize(
    ("fails", "said"),
    [
        ("down", "cannot reach http://"),
        ("silent", "did not answer within 0.5 s"),
        ("no gateway", "without JSON"),
        ("json, no gateway", "answered POST /v1/auth/token without an access_token: is --url (CARAVAN_URL)"),
    ],
)
async def test_killswitch_says_what_the_gateway_did_wrong(
    fails: str, said: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    if fails == "silent":
        monkeypatch.setattr(admincli, "HTTP_TIMEOUT_S", 0.5)  # rather than the minute a real gateway may take
    async with gateway_that(fails) as url:
        assert await run_cli("killswitch", "engage", "--reason", "drill", "--url", url, "--api-key", ADMIN_KEY) == 1
    assert said in capsys.readouterr().err


def _pasted(banner: str) -> str:
    """What a user copies from the banner: the login and the agent's task, then the team's task, each block as
    it stands under its title, to the empty line that ends it."""
    lines = banner.splitlines()
    pasted: list[str] = []
    for title in ("Log in as the demo customer", "Run a task on its team"):
        block = lines[lines.index(next(line for line in lines if line.startswith(title))) + 1 :]
        pasted += block[: block.index("")]
    return "\n".join(pasted)


async def _paste_into_a_shell(script: str) -> list[dict[str, Any]]:
    """Run the pasted lines with bash; the server-sent events it printed, in order."""
    proc = await asyncio.create_subprocess_exec(
        "bash", "-euo", "pipefail", "-c", script, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=90)
    assert proc.returncode == 0, err.decode()
    return [json.loads(line[6:]) for line in out.decode().splitlines() if line.startswith("data: {")]


def _served_at(settings: Settings, api: Api) -> Settings:
    url = urlsplit(api.base)
    return settings.model_copy(update={"http_host": url.hostname, "http_port": url.port})


@pytest.fixture
def no_provider_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine without provider keys: the demo's model is the local one, or the scripted one without it."""
    for env in PROVIDER_KEYS:
        monkeypatch.delenv(env, raising=False)


@pytest.mark.usefixtures("no_provider_keys")
async def test_the_demo_customer_gets_a_team_and_the_banner_starts_and_follows_its_agents_task_and_its_teams(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    settings = make_settings(nats_server.url, tmp_path / "data")
    async with ControlPlane(settings) as control, serve_api(control) as api:
        demo = _demo_model(settings)  # no key, no local model: the scripted one
        creds = await _demo_credentials(settings, control, demo)
        assert set(creds["demo_team_members"]) == {"writer", "critic"}
        team = await control.teams.get(creds["customer_id"], creds["demo_team_id"])
        assert team.mode == "round_robin" and team.members == list(creds["demo_team_members"].values())

        events = await _paste_into_a_shell(_pasted(_banner(_served_at(settings, api), "nats://x", creds, "m")))
        tasks = list(dict.fromkeys(e["task_id"] for e in events))  # the agent's task, then the team's
        assert len(tasks) == 2, tasks
        for task_id, speakers, text in (
            (tasks[0], ["user", "assistant"], creds["demo_task"]),
            (tasks[1], ["user", "writer", "critic", "writer"], creds["demo_team_task"]),
        ):
            streamed = [e for e in events if e["task_id"] == task_id]
            said = [(e["source"], e["content"]) for e in streamed if e["kind"] == "message"]
            assert [source for source, _ in said] == speakers
            assert said[0][1] == text and all(text for _, text in said)
            assert streamed[-1]["kind"] == "status" and streamed[-1]["content"] == "completed"  # its stream's end

        again = await _demo_credentials(settings, control, _demo_model(settings))  # the next `caravan up`
        assert {k: again[k] for k in creds} == creds
        assert [t.id for t in await control.teams.list(creds["customer_id"])] == [creds["demo_team_id"]]
        assert len(await control.agents.list(creds["customer_id"])) == 3  # assistant, writer, critic


@pytest.mark.usefixtures("no_provider_keys")
async def test_a_data_dir_from_before_the_demo_team_gets_one(nats_server: EmbeddedNats, tmp_path: Path) -> None:
    settings = make_settings(nats_server.url, tmp_path / "data")
    async with ControlPlane(settings) as control, serve_api(control) as api:
        old = await _demo_credentials(settings, control, replace(_demo_model(settings), team=[]))  # no team yet
        assert "demo_team_id" not in old and "Run a task on its team" not in _banner(settings, "nats://x", old, "m")

        upgraded = await _demo_credentials(settings, control, _demo_model(settings))
        assert {k: upgraded[k] for k in old} == old  # the same customer, key and agent
        assert (await control.teams.get(old["customer_id"], upgraded["demo_team_id"])).members == list(
            upgraded["demo_team_members"].values()
        )
        assert "Run a task on its team (writer and critic" in _banner(settings, "nats://x", upgraded, "m")
        headers = await api.token(upgraded["customer_api_key"])
        response = await api.client.post(
            "/v1/tasks", json={"team_id": upgraded["demo_team_id"], "task": "Go."}, headers=headers
        )
        assert response.status_code == 202, response.text
        task = await task_status(api, headers, response.json()["id"])
        assert task["status"] == "completed", task


def test_a_port_a_server_just_left_is_free_and_one_a_server_listens_on_is_not() -> None:
    """Connections a server closed linger in TIME_WAIT on its port for a minute; the next `caravan up` can listen
    there all the same (as nats-server and uvicorn do), so it must not move NATS to another port, or refuse to
    start, when it is restarted at once."""
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as nats-server and uvicorn listen
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert not cli._port_free("127.0.0.1", port)  # a server listens there
        with socket.create_connection(("127.0.0.1", port)) as client:
            accepted, _ = server.accept()
            accepted.close()  # the server closes first: its side of the connection waits in TIME_WAIT
            client.recv(1)
    assert cli._port_free("127.0.0.1", port)


def test_the_banner_says_where_the_dashboard_is(tmp_path: Path) -> None:
    settings = make_settings("nats://127.0.0.1:4222", tmp_path)
    base = f"http://{settings.http_host}:{settings.http_port}"
    lines = _banner(settings, "nats://x", {}, "m").splitlines()
    assert any(line.startswith(f"  Dashboard  {base}/dashboard ") for line in lines)


@pytest.mark.usefixtures("no_provider_keys")
@pytest.mark.parametrize(
    ("local_model", "said"), [(False, "switched off (CARAVAN_LOCAL_MODEL=0)"), (True, "not installed")]
)
def test_the_banner_says_why_the_demo_runs_on_scripted_answers(local_model: bool, said: str, tmp_path: Path) -> None:
    settings = make_settings("nats://127.0.0.1:4222", tmp_path, local_model=local_model, local_model_url=None)
    demo = _demo_model(settings)
    assert demo.model.provider == "replay"
    assert demo.about.endswith(f"the local model is {said})")


@pytest.mark.usefixtures("no_provider_keys")
async def test_the_banner_shows_no_admin_key_once_it_was_revoked(nats_server: EmbeddedNats, tmp_path: Path) -> None:
    """As README has it: to rotate the first start's admin key, start with a CARAVAN_ADMIN_KEY and revoke the
    old one. The next banner must not show the old one (it kept being shown, and got 401)."""
    first = make_settings(nats_server.url, tmp_path / "data", admin_key=None)
    async with ControlPlane(first) as control:
        old = await _demo_credentials(first, control, _demo_model(first))  # the first start: a key made for us
        assert f"Admin API key: {old['admin_api_key']}" in _banner(first, "nats://x", old, "m")
    settings = make_settings(nats_server.url, tmp_path / "data")  # the operator's own admin key from now on
    async with ControlPlane(settings) as control:
        assert (await _demo_credentials(settings, control, _demo_model(settings)))["admin_api_key"] == old[
            "admin_api_key"
        ]  # not revoked yet: still shown
        await control.auth.revoke("_".join(old["admin_api_key"].split("_")[:2]))  # its prefix, cvn_<8 hex>
        creds = await _demo_credentials(settings, control, _demo_model(settings))
        assert "admin_api_key" not in creds and "Admin API key" not in _banner(settings, "nats://x", creds, "m")
        assert {k: v for k, v in old.items() if k != "admin_api_key"} == creds  # the demo's own, as they were
    assert "admin_api_key" not in json.loads((tmp_path / "data" / "credentials.json").read_text())


@pytest.mark.parametrize("command", ["up", "serve"])
def test_the_help_of_up_and_serve_names_settings_that_exist(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0
    said = " ".join(capsys.readouterr().out.split())
    named = set(re.findall(r"CARAVAN_([A-Z_]+)", said))
    assert {"HTTP_PORT", "DATA_DIR"} <= named and "README.md, Settings" in said
    read_by_the_command = Path(cli.__file__).read_text()  # (CARAVAN_NATS_PORT is `up`'s own, not a setting)
    unknown = [
        n for n in named if n.lower() not in Settings.model_fields and f'"CARAVAN_{n}"' not in read_by_the_command
    ]
    assert not unknown, unknown


async def test_a_reader_that_goes_away_ends_the_command_without_a_traceback(api: Api) -> None:
    """`caravan audit | head`: its output's reader closed before it writes (as head's does once it has its lines)."""
    read, write = os.pipe()
    os.close(read)
    try:
        command = [sys.executable, "-m", "control.cli", "customers", "--url", api.base, "--api-key", ADMIN_KEY]
        done = await asyncio.to_thread(subprocess.run, command, stdout=write, stderr=subprocess.PIPE, timeout=60)
    finally:
        os.close(write)
    assert (done.returncode, done.stderr.decode()) == (1, "")
