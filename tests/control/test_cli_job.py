"""`caravan job render|plan <agent>`: an agent's job and Nomad's dry run of it, with nothing submitted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.protocol import ModelConfig
from control.backends.nomad import NomadConfig, NomadScheduler
from control.cli import UP_NATS_URL, _job
from control.models import AgentCreate, AgentUpdate, Resources
from control.natsauth import NatsAuth
from control.natsserver import EmbeddedNats
from control.platform import ControlPlane
from tests.conftest import make_settings
from tests.support.nomad_double import NomadDouble


async def test_render_and_plan_an_agents_job_without_submitting_it(
    nats_server: EmbeddedNats, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with NomadDouble() as double:
        settings = make_settings(nats_server.url, tmp_path / "data", scheduler="nomad", nomad_addr=double.address)
        async with ControlPlane(settings, NomadScheduler(NomadConfig(address=double.address))) as control:
            customer, _ = await control.auth.create_customer("acme")
            model = ModelConfig(provider="replay", name="s", responses=["ok"])
            agent = await control.agents.create(customer.id, AgentCreate(name="big", model=model))
            await control.agents.stop(customer.id, agent.id)
            await control.agents.update(
                customer.id, agent.id, AgentUpdate(resources=Resources(cpu=200, memory_mb=65_536))
            )
        registers = len([r for r in double.requests if r[0] == "POST" and r[1].startswith(f"/v1/job/{agent.job_id}?")])

        assert await _job(settings, "render", agent.id) == 0
        rendered = json.loads(capsys.readouterr().out)
        assert (
            rendered["Job"]["ID"] == agent.job_id
            and rendered["Job"]["TaskGroups"][0]["Tasks"][0]["Resources"]["MemoryMB"] == 65_536
        )

        assert await _job(settings, "plan", agent.id) == 0
        out = capsys.readouterr().out
        assert f"Job {agent.job_id} in namespace {agent.namespace}: Edited" in out
        assert 'Dimension "memory" exhausted on 1 nodes' in out
        after = len([r for r in double.requests if r[0] == "POST" and r[1].startswith(f"/v1/job/{agent.job_id}?")])
        assert after == registers  # planned, never registered

        assert await _job(settings, "render", "ag-000000000000") == 1
        assert capsys.readouterr().err == "caravan: agent ag-000000000000 not found\n"  # one line, as every command's
        assert await _job(settings, "plan", "../etc") == 2
        assert capsys.readouterr().err == "caravan: not an agent id: '../etc'\n"
        local = settings.model_copy(update={"scheduler": "local"})
        assert await _job(local, "plan", agent.id) == 2
        assert capsys.readouterr().err.startswith("caravan: `caravan job plan` asks Nomad: ")


async def test_render_reads_the_agents_on_the_nats_that_caravan_up_runs_with_auth_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    auth = NatsAuth(data / "nats")  # as `caravan up` lays it out: users and their secret under the data dir
    async with EmbeddedNats(data / "nats", auth=True) as server:
        auth.server = server
        settings = make_settings(server.url, data)
        async with ControlPlane(settings, nats_auth=auth) as control:
            customer, _ = await control.auth.create_customer("acme")
            model = ModelConfig(provider="replay", name="s", responses=["ok"])
            agent = await control.agents.create(customer.id, AgentCreate(name="guarded", model=model))
            assert await _job(settings, "render", agent.id) == 0  # logged in as the control plane's user
            assert json.loads(capsys.readouterr().out)["Job"]["ID"] == agent.job_id
        auth.path.unlink()  # the server keeps the users it loaded; only the secret is left on disk
        assert await _job(settings, "render", agent.id) == 0
        assert json.loads(capsys.readouterr().out)["Job"]["ID"] == agent.job_id
        assert not auth.path.exists()  # a read-only command made no users file


async def test_render_finds_the_nats_caravan_up_runs_where_it_came_to_listen(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`caravan up` may run NATS elsewhere than 4222 (--nats-port, CARAVAN_NATS_PORT, 4222 taken): without a NATS
    URL given, `caravan job` reads where from the data dir, and the job it renders names that NATS to the agent."""
    data = tmp_path / "data"
    async with EmbeddedNats(data / "nats") as server:
        settings = make_settings(server.url, data)
        async with ControlPlane(settings) as control:
            customer, _ = await control.auth.create_customer("acme")
            model = ModelConfig(provider="replay", name="s", responses=["ok"])
            agent = await control.agents.create(customer.id, AgentCreate(name="moved", model=model))
        (data / "nats" / UP_NATS_URL).write_text(server.url)  # as `caravan up` notes it
        unset = type(settings)(**settings.model_dump(exclude={"nats_url"}))
        assert unset.nats_url != server.url
        assert await _job(unset, "render", agent.id) == 0
        env = json.loads(capsys.readouterr().out)["Job"]["TaskGroups"][0]["Tasks"][0]["Env"]
        assert env["NATS_URL"] == server.url
