"""The `caravan killswitch` verbs against a running gateway, and what `caravan up` gives the demo customer."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from control.cli import _banner, _demo_credentials, _demo_model, main
from control.natsserver import EmbeddedNats
from control.platform import ControlPlane
from control.settings import Settings
from tests.conftest import ADMIN_KEY, Api, make_settings, serve_api
from tests.gateway.teams_support import task_status

PROVIDER_KEYS = ("OPENAI_API_KEY", "OPENROUTER_API_KEY", "GROQ_API_KEY", "DEEPSEEK_API_KEY", "ANTHROPIC_API_KEY")


async def run_cli(*argv: str) -> int:
    def call() -> int:
        try:
            main(list(argv))
        except SystemExit as exc:
            return int(exc.code) if isinstance(exc.code, int) else 1
        return 0

    return await asyncio.to_thread(call)


async def test_killswitch_engage_status_release(api: Api, capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--url", api.base, "--api-key", ADMIN_KEY]
    assert await run_cli("killswitch", "engage", "--reason", "drill", *common) == 0
    assert "killswitch engaged (all" in capsys.readouterr().out
    assert await run_cli("killswitch", "status", *common) == 0
    status = capsys.readouterr().out
    assert "ENGAGED all" in status and "drill" in status
    assert await run_cli("killswitch", "release", *common) == 0
    assert await run_cli("killswitch", "status", *common) == 0
    assert "no killswitch engaged" in capsys.readouterr().out


async def test_killswitch_cli_explains_failures(api: Api, capsys: pytest.CaptureFixture[str]) -> None:
    assert await run_cli("killswitch", "engage", "--url", api.base, "--api-key", "wrong-key-0123456789") == 1
    assert (
        await run_cli(
            "killswitch", "engage", "--customer", "cu-000000000000", "--url", api.base, "--api-key", ADMIN_KEY
        )
        == 1
    )


def _pasted(banner: str) -> str:
    """What a user copies from the banner: the login, then the team's block (the agent's task line has a
    `<task id>` to fill in)."""
    lines = banner.splitlines()
    login = lines.index(next(line for line in lines if line.startswith("  export CARAVAN_API_KEY=")))
    team = lines.index(next(line for line in lines if line.startswith("Run a task on its team")))
    block = lines[team + 1 :]
    return "\n".join(lines[login : login + 3] + block[: block.index("")])


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
async def test_the_demo_customer_gets_a_team_whose_task_the_banner_starts_and_follows(
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
        said = [(e["source"], e["content"]) for e in events if e["kind"] == "message"]
        assert [source for source, _ in said] == ["user", "writer", "critic", "writer"]
        assert said[0][1] == creds["demo_team_task"] and all(text for _, text in said)
        assert events[-1]["kind"] == "status" and events[-1]["content"] == "completed"  # the stream ended there

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
