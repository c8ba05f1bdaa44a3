"""`caravan up` as a newcomer runs it (what ./dev/up execs): one process that starts NATS, the control plane,
the gateway and the agents' processes, prints where to reach them, and stops them all on Ctrl-C."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from agent.protocol import PROVIDER_KEY_ENV
from control.cli import UP_NATS_URL
from tests.support.helpers import assert_eventually, free_port

CARAVAN = str(Path(sys.executable).with_name("caravan"))


def _env(data: Path, http_port: int, nats_port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CARAVAN_", "NATS_")) and k != "NOMAD_ADDR"}
    for key in PROVIDER_KEY_ENV.values():
        env.pop(key, None)
    return env | {
        "CARAVAN_DATA_DIR": str(data),
        "CARAVAN_HTTP_PORT": str(http_port),
        "CARAVAN_NATS_PORT": str(nats_port),
        "CARAVAN_LOCAL_MODEL": "0",  # the scripted demo: the local model has tests of its own
    }


def _ours(data: Path) -> list[int]:
    """Processes still running from the data dir: NATS stores there, agents run in allocation dirs under it."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            where = [os.readlink(proc / "cwd"), (proc / "cmdline").read_bytes().decode(errors="replace")]
            if any(str(data) in w for w in where):
                found.append(int(proc.name))
    return found


@contextlib.asynccontextmanager
async def caravan_up(env: dict[str, str]) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """`caravan up`, running until its banner is out; the banner. Ctrl-C (SIGINT) on leaving, as a user stops it."""
    proc = await asyncio.create_subprocess_exec(
        CARAVAN, "up", env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    assert proc.stdout is not None
    out: list[str] = []
    try:
        async with asyncio.timeout(120):
            while not out or not out[-1].startswith("Ctrl-C stops everything"):
                line = await proc.stdout.readline()
                assert line, "caravan up ended before its banner:\n" + "".join(out)
                out.append(line.decode())
        yield proc, "".join(out)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
        rest, _ = await asyncio.wait_for(proc.communicate(), timeout=120)
        out.append(rest.decode())
        proc.output = "".join(out)  # type: ignore[attr-defined]


async def _task_completed(base: str, api_key: str, agent_id: str, task: str) -> dict[str, object]:
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        token = (await client.post("/v1/auth/token", json={"api_key": api_key})).json()["access_token"]
        headers = {"Authorization": f"Bearer {token}"}
        started = await client.post("/v1/tasks", json={"agent_id": agent_id, "task": task}, headers=headers)
        assert started.status_code == 202, started.text
        got = await assert_eventually(
            lambda: client.get(f"/v1/tasks/{started.json()['id']}", headers=headers),
            lambda r: r.json()["status"] in ("completed", "failed", "cancelled"),
            within=90,
            what="the demo task's end",
        )
        return dict(got.json())


async def test_up_serves_where_it_says_stops_everything_on_ctrl_c_and_finds_its_state_again(tmp_path: Path) -> None:
    data = tmp_path / "var"
    http_port = free_port()
    with socket.socket() as taken:  # someone else's NATS on the port asked for: up must listen elsewhere
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        nats_port = taken.getsockname()[1]
        env = _env(data, http_port, nats_port)
        async with caravan_up(env) as (proc, banner):
            base = f"http://127.0.0.1:{http_port}"
            assert f"API        {base}" in banner
            url = (data / "nats" / UP_NATS_URL).read_text()
            listening = urlsplit(url).port
            assert listening != nats_port and f"@127.0.0.1:{listening} 'caravan.events.>'" in banner

            rendered = await asyncio.create_subprocess_exec(
                CARAVAN, "job", "render", json.loads((data / "credentials.json").read_text())["demo_agent_id"],
                env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, err = await asyncio.wait_for(rendered.communicate(), timeout=60)
            assert rendered.returncode == 0, err.decode()
            assert json.loads(out)["Job"]["TaskGroups"][0]["Tasks"][0]["Env"]["NATS_URL"] == url

            second = await asyncio.create_subprocess_exec(  # as if the HTTP port's being taken were the only trouble
                CARAVAN, "up", env=env | {"CARAVAN_HTTP_PORT": str(free_port())},
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            try:
                out, err = await asyncio.wait_for(second.communicate(), timeout=60)
            finally:
                if second.returncode is None:  # it runs (a second platform on the same store): stopped as a user would
                    second.send_signal(signal.SIGINT)
                    await asyncio.wait_for(second.wait(), timeout=120)
            assert second.returncode == 1, (out + err).decode()
            assert f"data dir {data} is in use by another caravan (pid {proc.pid})" in err.decode(), err.decode()
            assert (data / "nats" / UP_NATS_URL).read_text() == url  # nothing of the first one's touched

            creds = json.loads((data / "credentials.json").read_text())
            done = await _task_completed(base, creds["customer_api_key"], creds["demo_agent_id"], creds["demo_task"])
            assert done["status"] == "completed", done
            assert _ours(data)  # NATS and the agent run from the data dir

    assert proc.returncode == 0, proc.output  # type: ignore[attr-defined]
    assert "Stopping agents and NATS" in proc.output  # type: ignore[attr-defined]
    assert _ours(data) == [], "left running after Ctrl-C"

    async with caravan_up(_env(data, http_port, nats_port)):  # the next ./dev/up
        assert json.loads((data / "credentials.json").read_text()) == creds
        assert urlsplit((data / "nats" / UP_NATS_URL).read_text()).port == nats_port  # free now: as it started
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}", timeout=30) as client:
            token = (await client.post("/v1/auth/token", json={"api_key": creds["customer_api_key"]})).json()
            headers = {"Authorization": f"Bearer {token['access_token']}"}
            listed = (await client.get("/v1/tasks", headers=headers)).json()
        assert [t["id"] for t in listed] == [done["id"]], listed
