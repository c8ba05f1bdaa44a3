"""The ``caravan`` command: ``up`` (the embedded platform), ``serve`` (gateway + control plane only), ``job render``
and ``job plan`` (an agent's job, without submitting it)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import uvicorn

from agent.protocol import ModelConfig, ScriptedToolCall
from control.backends import create_scheduler
from control.backends.base import SchedulerError
from control.ids import is_plain_id
from control.jobspec import agent_job
from control.models import Agent, AgentCreate
from control.natsio import connect
from control.natsserver import EmbeddedNats
from control.platform import ControlPlane
from control.settings import Settings
from control.store import Repo
from gateway.app import create_app

__all__ = ["main"]

log = logging.getLogger("caravan")


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
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


async def _serve(settings: Settings, control: ControlPlane, banner: str | None = None) -> None:
    app = create_app(settings, control)
    config = uvicorn.Config(app, host=settings.http_host, port=settings.http_port, log_level="warning")
    server = _Server(config)

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
    if server.started and banner:
        print(banner, flush=True)
    await serving


def _credentials_path(settings: Settings) -> Path:
    return settings.data_dir / "credentials.json"


async def _demo_credentials(settings: Settings, control: ControlPlane) -> dict[str, Any]:
    """The demo customer and its agent, made on the first run; their keys kept (0600) under the data dir."""
    path = _credentials_path(settings)
    saved: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    if control.bootstrap_admin_key is not None:
        saved["admin_api_key"] = control.bootstrap_admin_key.api_key
    if "customer_api_key" not in saved:
        customer, key = await control.auth.create_customer("demo")
        saved.update(customer_id=customer.id, customer_api_key=key.api_key)
        agent = await control.agents.create(
            customer.id,
            AgentCreate(
                name="assistant",
                system_message="You are a helpful assistant. Use the calculator for arithmetic.",
                model=ModelConfig(
                    provider="replay",
                    name="scripted-demo",
                    responses=[
                        ScriptedToolCall(tool="calculator", arguments={"expression": "6 * 7"}),
                        "The answer is 42. (This agent runs on the offline scripted model.)",
                    ],
                ),
                tools=["calculator"],
            ),
        )
        saved["demo_agent_id"] = agent.id
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600, exist_ok=True)
    path.write_text(json.dumps(saved, indent=2))
    return saved


def _banner(settings: Settings, nats_url: str, creds: dict[str, Any]) -> str:
    base = f"http://{settings.http_host}:{settings.http_port}"
    key = creds.get("customer_api_key", "")
    agent = creds.get("demo_agent_id", "<agent id>")
    lines = [
        "",
        "Caravan is up (embedded default: local scheduler, NATS JetStream, JetStream KV flags).",
        f"  API        {base}",
        f"  API docs   {base}/docs",
        f"  NATS       {nats_url}    watch events: nats sub -s {nats_url} 'caravan.events.>'",
        f"  Data       {settings.data_dir.resolve()}  (credentials in {_credentials_path(settings).name})",
        "",
        "Log in as the demo customer and run a task on its agent:",
        f"  export CARAVAN_API_KEY={key}",
        f"  TOKEN=$(curl -s {base}/v1/auth/token -H 'content-type: application/json' \\",
        '      -d "{\\"api_key\\": \\"$CARAVAN_API_KEY\\"}" | python3 -c \'import json,sys; '
        'print(json.load(sys.stdin)["access_token"])\')',
        f'  curl -s {base}/v1/agents -H "Authorization: Bearer $TOKEN"',
        f"  curl -s {base}/v1/tasks -H \"Authorization: Bearer $TOKEN\" -H 'content-type: application/json' \\",
        f'      -d \'{{"agent_id": "{agent}", "task": "What is 6 times 7?"}}\'',
        f'  curl -sN {base}/v1/tasks/<task id>/events -H "Authorization: Bearer $TOKEN"',
    ]
    if creds.get("admin_api_key"):
        lines += ["", f"Admin API key: {creds['admin_api_key']}"]
    lines += ["", "Ctrl-C stops everything (agents included); the next ./dev/up finds this state again.", ""]
    return "\n".join(lines)


async def _up(settings: Settings, nats_port: int) -> None:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    if not _port_free(settings.http_host, settings.http_port):
        raise SystemExit(f"port {settings.http_port} is in use: set CARAVAN_HTTP_PORT to a free port")
    port = nats_port if _port_free("127.0.0.1", nats_port) else 0
    async with EmbeddedNats(settings.data_dir / "nats", port=port) as nats_server:
        if port == 0:
            log.warning("port %s is in use; NATS listens on %s instead", nats_port, nats_server.port)
        settings = settings.model_copy(update={"nats_url": nats_server.url})
        async with ControlPlane(settings) as control:
            creds = await _demo_credentials(settings, control)
            await _serve(settings, control, _banner(settings, nats_server.url, creds))
            print("Stopping agents and NATS...", flush=True)


async def _serve_only(settings: Settings) -> None:
    async with ControlPlane(settings) as control:
        if control.bootstrap_admin_key is not None:
            print(f"First start: one-time admin API key (store it now): {control.bootstrap_admin_key.api_key}")
        await _serve(settings, control, f"Caravan API on http://{settings.http_host}:{settings.http_port}")


async def _job(settings: Settings, verb: str, agent_id: str) -> int:
    """Print an agent's rendered job (``render``) or Nomad's plan of it (``plan``); nothing is submitted."""
    if not is_plain_id(agent_id):
        print(f"not an agent id: {agent_id!r}", file=sys.stderr)
        return 2
    jet = await connect(settings.nats_url, name="caravan-cli")
    try:
        found = await Repo(jet.kv["agents"], Agent).find(agent_id)
    finally:
        await jet.close()
    if found is None:
        print(f"agent {agent_id} not found", file=sys.stderr)
        return 1
    job = agent_job(found[1], settings)
    if verb == "render":
        print(json.dumps({"Job": job}, indent=2))
        return 0
    from control.backends.nomad import NomadScheduler, explain_placement

    scheduler = create_scheduler(settings)
    if not isinstance(scheduler, NomadScheduler):
        print("`caravan job plan` asks Nomad: set CARAVAN_SCHEDULER=nomad and NOMAD_ADDR", file=sys.stderr)
        return 2
    try:
        async with scheduler:
            plan = await scheduler.plan(job)
    except SchedulerError as exc:
        print(f"plan failed: {exc}", file=sys.stderr)
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="caravan", description="Run AutoGen agent teams on Nomad.")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="run the embedded platform: NATS, control plane, gateway, local scheduler")
    up.add_argument("--nats-port", type=int, default=int(os.environ.get("CARAVAN_NATS_PORT", "4222")))
    sub.add_parser("serve", help="run the gateway and control plane against NATS_URL and the configured scheduler")
    job = sub.add_parser("job", help="an agent's Nomad job, without submitting it")
    job.add_argument("verb", choices=["render", "plan"], help="render: print the job JSON; plan: Nomad's dry run")
    job.add_argument("agent_id")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings()
    if args.command == "job":
        logging.getLogger().setLevel(logging.WARNING)
        sys.exit(asyncio.run(_job(settings, args.verb, args.agent_id)))
    try:
        if args.command == "up":
            asyncio.run(_up(settings, args.nats_port))
        else:
            asyncio.run(_serve_only(settings))
    except KeyboardInterrupt:
        pass
    sys.exit(0)
