"""The agent process on its own: configuration errors, a missing definition, health, and SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import httpx
import pytest

from agent.protocol import ModelConfig
from control.models import AgentCreate
from control.platform import ControlPlane
from tests.support.helpers import assert_eventually


async def run_agent(env: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agent",
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )


async def test_missing_configuration_exits_2_with_a_message() -> None:
    proc = await run_agent({"CARAVAN_AGENT_ID": "", "NATS_URL": ""})
    out, _ = await proc.communicate()
    assert proc.returncode == 2 and b"missing environment" in out


async def test_a_bad_polling_window_exits_2_naming_it() -> None:
    env = {"CARAVAN_AGENT_ID": "ag-00000000dead", "CARAVAN_CUSTOMER_ID": "cu-00000000dead", "NATS_URL": "nats://x"}
    proc = await run_agent({**env, "CARAVAN_SPIN_US": "-5"})
    out, _ = await proc.communicate()
    assert proc.returncode == 2 and b"CARAVAN_SPIN_US must be a number of microseconds" in out


async def test_unknown_agent_exits_3_saying_the_control_plane_refused(control: ControlPlane) -> None:
    env = {
        "CARAVAN_AGENT_ID": "ag-00000000dead",
        "CARAVAN_CUSTOMER_ID": "cu-00000000dead",
        "NATS_URL": control.settings.nats_url,
    }
    proc = await run_agent(env)
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 3 and b"unknown agent" in out


async def test_health_endpoint_and_clean_exit_on_sigterm(control: ControlPlane) -> None:
    customer, _ = await control.auth.create_customer("c")
    agent = await control.agents.create(
        customer.id, AgentCreate(name="a", model=ModelConfig(provider="replay", name="s", responses=["x"]))
    )
    await control.agents.stop(customer.id, agent.id)  # run this one by hand instead of by the scheduler
    port = 20000 + os.getpid() % 20000
    env = {
        "CARAVAN_AGENT_ID": agent.id,
        "CARAVAN_CUSTOMER_ID": customer.id,
        "NATS_URL": control.settings.nats_url,
        "CARAVAN_HEALTH_PORT": str(port),
    }
    proc = await run_agent(env)
    try:
        async with httpx.AsyncClient() as client:

            async def probe() -> int:
                try:
                    return (await client.get(f"http://127.0.0.1:{port}/health")).status_code
                except httpx.TransportError:
                    return 0

            await assert_eventually(probe, lambda code: code == 200, what="healthy")
            body = (await client.get(f"http://127.0.0.1:{port}/health")).json()
            assert body["agent_id"] == agent.id and body["nats"] == "connected"
            assert (await client.get(f"http://127.0.0.1:{port}/other")).status_code == 404
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), timeout=15)
    assert proc.returncode == 0


async def test_an_agent_without_its_models_key_exits_2_naming_it(
    control: ControlPlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checked at start, before it says it is ready: not at its first task."""
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-" + "t" * 20)  # the platform had it when the agent was made
    customer, _ = await control.auth.create_customer("c")
    model = ModelConfig(provider="anthropic", name="claude-3-5-haiku-latest")
    agent = await control.agents.create(customer.id, AgentCreate(name="a", model=model))
    await control.agents.stop(customer.id, agent.id)  # run this one by hand instead of by the scheduler
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    env = {"CARAVAN_AGENT_ID": agent.id, "CARAVAN_CUSTOMER_ID": customer.id, "NATS_URL": control.settings.nats_url}
    proc = await run_agent(env)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 2, out
    assert b"ANTHROPIC_API_KEY" in out and b"ready" not in out, out
