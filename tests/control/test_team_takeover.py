"""A control-plane replica dies in the middle of a team run, its work-queue message never acknowledged; another
replica takes the run over after the queue's ack wait and goes on from the last checkpoint."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest

from agent.aio import HAND_BACK_DELAY_S
from agent.protocol import TASKS_STREAM
from agent.teamprotocol import TEAM_CONSUMER
from control.models import Task
from control.natsio import Jet, connect
from control.natsserver import EmbeddedNats
from control.platform import ControlPlane
from control.store import LargeRepo, Repo
from control.teams.models import Checkpoint
from control.teams.runner import TeamRunner
from tests.conftest import make_settings, serve_api
from tests.gateway.teams_support import (
    MaxMessageTermination,
    TextMentionTermination,
    agents,
    api_transcript,
    attempt_messages,
    checkpointed_messages,
    local_team,
    local_transcript,
    local_usage,
    run_local,
    script,
    start,
    task_status,
    team,
)
from tests.support.helpers import assert_eventually, nats_connect, now

SPECS = {
    "steady": {"model": script("s1", "s2", "s3")},
    "slow": {"model": script("w1", "w2", "w3", delay_ms=800)},
}


async def replica(control: ControlPlane, name: str) -> tuple[TeamRunner, Jet]:
    """Another control-plane replica's team runner, on its own NATS connection."""
    jet = await connect(control.settings.nats_url, name=name)
    runner = TeamRunner(
        jet,
        Repo(jet.kv["tasks"], Task),
        LargeRepo(jet.kv["team_state"], Checkpoint),
        control.teams,
        control.agents,
        control.team_runner.config,
    )
    await runner.start()
    return runner, jet


@contextlib.asynccontextmanager
async def replica_serving(control: ControlPlane, name: str) -> AsyncIterator[TeamRunner]:
    """:func:`replica` for the block: stopped (what it runs handed back) and its connection closed at its end."""
    runner, jet = await replica(control, name)
    try:
        yield runner
    finally:
        await runner.stop()
        await jet.close()


async def crash(runner: TeamRunner, jet: Jet) -> None:
    """What a killed process leaves: its connection drops at once, nothing is acknowledged or handed back."""
    await jet.nc.close()
    work = [t for t in (runner._loop, *runner._runs) if t is not None]
    for task in work:
        task.cancel()
    await asyncio.gather(*work, return_exceptions=True)


async def test_a_crashed_control_plane_replicas_run_is_taken_over_from_its_last_checkpoint(tmp_path: Path) -> None:
    async with EmbeddedNats(tmp_path / "nats") as nats_server:
        settings = make_settings(nats_server.url, tmp_path / "data", team_ack_wait_s=2)
        control = ControlPlane(settings)
        async with control, serve_api(control) as api:
            await control.team_runner.stop()  # the replicas below are the only ones that run teams
            customer_id, headers = await api.new_customer()
            made = await agents(api, headers, SPECS)
            created = await team(api, headers, members=[made[n]["id"] for n in SPECS], termination={"max_messages": 7})
            first, first_jet = await replica(control, "replica-a")
            task_id = await start(api, headers, created["id"], "Go.")
            saved = await assert_eventually(
                lambda: checkpointed_messages(api, customer_id, task_id),
                lambda m: len(m) >= 4,
                what="a checkpoint after four messages",
            )
            await crash(first, first_jet)
            crashed = (await api.client.get(f"/v1/tasks/{task_id}", headers=headers)).json()
            assert crashed["status"] == "running" and crashed["attempt"] == 1

            async with replica_serving(control, "replica-b"):
                done = await task_status(api, headers, task_id, within=60)
            assert done["status"] == "completed", (done["status_reason"], done["messages"])
            assert done["attempt"] == 2
            replayed, produced = await attempt_messages(api, headers, task_id, 2)

    local = local_team(SPECS, "round_robin", MaxMessageTermination(7))
    items, local_stop = await run_local(local, "Go.")
    assert api_transcript(done) == local_transcript(items)  # nothing lost, nothing twice
    assert done["usage"] == local_usage(items)  # the members' model contexts came back whole
    assert done["status_reason"] == local_stop
    assert replayed[: len(saved)] == saved  # the new attempt went on from the checkpoint (or a later one)
    assert replayed + produced == [(m["source"], m["content"]) for m in done["messages"]]
    assert "s1" not in [content for _, content in produced]  # the second replica asked nobody to say it again


def transfer(to: str) -> dict[str, object]:
    return {"tool": f"transfer_to_{to}", "arguments": {}}


MODES = {
    "selector": (
        {
            "planner": {"model": script("p1", "p2")},
            "coder": {"model": script("c1", "c2", delay_ms=600)},
            "critic": {"model": script("k1", "k2")},
        },
        {"selector": {"model": script("coder", "critic", "coder", "planner", "critic")}},
        6,
    ),
    "swarm": (
        {
            "triage": {"model": script(transfer("billing"), "Anything else? DONE")},
            "billing": {"model": script("Refund issued.", "Paid back.", transfer("triage"), delay_ms=600)},
        },
        {},
        20,
    ),
}


@pytest.mark.parametrize("mode", list(MODES))
async def test_a_stopping_replica_hands_its_run_over_mid_conversation(tmp_path: Path, mode: str) -> None:
    specs, extra, max_messages = MODES[mode]
    async with EmbeddedNats(tmp_path / "nats") as nats_server:
        # no run comes back by the ack wait running out during this test: only a replica's hand-back frees one
        control = ControlPlane(make_settings(nats_server.url, tmp_path / "data", team_ack_wait_s=3600))
        watcher = await nats_connect(nats_server.url)
        acks: list[bytes] = []  # what the replicas tell JetStream about the run's work-queue message

        async def on_ack(msg: nats.aio.msg.Msg) -> None:
            acks.append(msg.data)

        await watcher.subscribe(f"$JS.ACK.{TASKS_STREAM}.{TEAM_CONSUMER}.>", cb=on_ack)
        await watcher.flush()
        async with control, serve_api(control) as api:
            await control.team_runner.stop()
            customer_id, headers = await api.new_customer()
            made = await agents(api, headers, specs)
            ids = {n: made[n]["id"] for n in specs}
            if mode == "swarm":
                extra = {"handoffs": {ids["triage"]: [ids["billing"]], ids["billing"]: [ids["triage"]]}}
                termination = {"text_mention": "DONE", "max_messages": max_messages}
            else:
                termination = {"max_messages": max_messages}
            created = await team(api, headers, members=list(ids.values()), mode=mode, termination=termination, **extra)
            first, first_jet = await replica(control, "replica-a")
            task_id = await start(api, headers, created["id"], "Help me.")
            saved = await assert_eventually(
                lambda: checkpointed_messages(api, customer_id, task_id), lambda m: len(m) >= 3, what="a checkpoint"
            )
            await first.stop()  # hands the run back (nak) in the middle of the slow member's turn
            await first_jet.close()
            # a run handed back where nobody reads it (a pull request left waiting) would wait for the ack wait
            async with replica_serving(control, "replica-b"):
                done = await task_status(api, headers, task_id)
            replayed, produced = await attempt_messages(api, headers, task_id, 2)
            # the first replica handed the run back (nak); the second ran it to the end and acknowledged it
            # (the nak with a delay, which JetStream stores: see agent.aio.HAND_BACK_DELAY_S)
            nak = b'-NAK {"delay": %d}' % int(HAND_BACK_DELAY_S * 10**9)
            await assert_eventually(now(lambda: list(acks)), lambda seen: seen == [nak, b""], what="nak, ack")
        await watcher.close()

    assert done["status"] == "completed", (done["status_reason"], done["messages"])
    assert done["attempt"] == 2
    if mode == "swarm":
        handoffs = {"triage": ["billing"], "billing": ["triage"]}
        condition = TextMentionTermination("DONE") | MaxMessageTermination(max_messages)
        local = local_team(specs, mode, condition, handoffs)
    else:
        local = local_team(specs, mode, MaxMessageTermination(max_messages), selector_model=extra["selector"]["model"])
    items, local_stop = await run_local(local, "Help me.")
    assert api_transcript(done) == local_transcript(items)
    assert done["usage"] == local_usage(items)
    assert done["status_reason"] == local_stop
    assert replayed[: len(saved)] == saved
    said = [(m["source"], m["content"]) for m in done["messages"] if m["type"] not in ("tool_call", "tool_result")]
    assert replayed + produced == said


async def test_a_run_handed_back_after_each_of_its_attempts_ends_failed_saying_so(tmp_path: Path) -> None:
    """A run broken off in each of its 3 attempts (here by control planes that stopped mid-conversation: a
    restart of each, say) is not run a fourth time: the replica it comes back to ends it `failed`, saying why,
    with the third attempt's transcript. The fourth attempt used to run, and after its hand-back JetStream
    delivered the run no more: the task stayed `running` for good, and a cancel could not end it."""
    async with EmbeddedNats(tmp_path / "nats") as nats_server:
        control = ControlPlane(make_settings(nats_server.url, tmp_path / "data", team_ack_wait_s=3600))
        async with control, serve_api(control) as api:
            await control.team_runner.stop()  # the replicas below are the only ones that run teams
            _, headers = await api.new_customer()
            made = await agents(api, headers, {"slow": {"model": script("w1", "w2", "w3", delay_ms=60_000)}})
            created = await team(api, headers, members=[made["slow"]["id"]], termination={"max_messages": 4})
            task_id = await start(api, headers, created["id"], "Help me.")
            for attempt in (1, 2, 3):
                async with replica_serving(control, f"replica-{attempt}"):  # stopped at the block's end: handed back
                    await assert_eventually(  # (the record says attempt 1 `running` until this replica's replays)
                        lambda: api.client.get(f"/v1/tasks/{task_id}", headers=headers),
                        lambda r, n=attempt: (r.json()["status"], r.json()["attempt"]) == ("running", n),
                        what=f"attempt {attempt} running",
                    )
            async with replica_serving(control, "replica-4"):
                done = await task_status(api, headers, task_id)

    assert (done["status"], done["attempt"]) == ("failed", 3), done
    assert done["status_reason"] == (
        "its run broke off during each of its 3 attempts (a member lost, or a control plane that stopped or "
        "crashed): not tried again"
    )
    assert [m["content"] for m in done["messages"]] == ["Help me."]  # the third attempt's (the member never answered)
