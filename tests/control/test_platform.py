"""The control plane as a library component: starting one leaves process-wide state to the process."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc

import nats
import pytest

from agent.wire import Wire
from control.backends.base import SchedulerUnreachable
from control.backends.local import LocalScheduler
from control.natsserver import EmbeddedNats
from control.platform import ControlPlane
from control.services.agents import AgentService
from control.services.audit import AUDIT_STREAM
from control.settings import Settings
from tests.support.helpers import assert_eventually, now, stalled


async def test_starting_a_control_plane_leaves_the_garbage_collector_alone(settings: Settings) -> None:
    frozen = gc.get_freeze_count()
    async with ControlPlane(settings):
        assert gc.get_freeze_count() == frozen  # freezing is for the process entry point (caravan up/serve)


@pytest.mark.parametrize("spin_us", [0.0, 250.0])
async def test_the_control_plane_polls_for_answers_as_its_settings_say(settings: Settings, spin_us: float) -> None:
    """CARAVAN_SPIN_US as the platform's settings read it, for its own connection as for its agents' jobs."""
    async with ControlPlane(settings.model_copy(update={"spin_us": spin_us})) as control:
        assert Wire.of(control.jet.nc).spin_s == spin_us / 1e6


async def test_a_broadcast_that_meets_a_stalled_nats_leaves_the_control_plane_hearing_it(
    nats_server: EmbeddedNats, settings: Settings
) -> None:
    """A broadcast waits for NATS to have it. One that gives up on a stalled server (here cancelled; at its timeout
    likewise) must not leave a waiter for the server's late answer behind: nats-py's flush() cancels its own, and
    the late answer then stopped the connection's read loop for good, the control plane connected and deaf (every
    request 503, not ready, until restarted)."""
    async with ControlPlane(settings) as control:
        with stalled(nats_server.pid):
            broadcast = asyncio.ensure_future(control.broadcast("maintenance at noon", "admin"))
            await asyncio.sleep(0.3)
            assert not broadcast.done()  # waiting for the server
            broadcast.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await broadcast
        assert await control.answering(within_s=5)


async def test_an_audit_stream_limited_by_hand_is_reported_and_left_as_it_is(
    nats_server: EmbeddedNats, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """Caravan never changes the audit stream it finds (on its own NATS its user may not: a limit would purge it by
    another name); one whose configuration lets records go is an error in the log, naming what."""
    async with ControlPlane(settings):
        pass
    async with ControlPlane(settings):  # as it made it: nothing to say
        pass
    assert not [r for r in caplog.records if r.name == "caravan.audit"]
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        limited = dataclasses.replace((await js.stream_info(AUDIT_STREAM)).config, max_age=3600.0)
        await js.update_stream(limited)
        async with ControlPlane(settings):
            pass
        assert (await js.stream_info(AUDIT_STREAM)).config.max_age == 3600.0
    finally:
        await nc.close()
    (error,) = [r for r in caplog.records if r.name == "caravan.audit"]
    assert error.levelname == "ERROR" and "lets records go" in error.getMessage() and "max_age" in error.getMessage()


@pytest.mark.parametrize("failing", ["scheduler start", "reconcile"])
async def test_a_start_that_fails_part_way_stops_what_it_started(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    """A start that fails (say Nomad unreachable when agents are put back, the last step) raises its own error and
    leaves nothing running: ``async with`` runs no stop() for a start that failed, and what had started (the NATS
    connection and its tasks, the killswitch and registry watchers, the scheduler, the task tracker's lease, the
    team runner) ran on in the process. The next start is not kept from the tracker's lease."""
    error = SchedulerUnreachable("Nomad gave no answer: connection refused")

    async def fail(*_: object) -> None:
        raise error

    target = (LocalScheduler, "start") if failing == "scheduler start" else (AgentService, "reconcile")
    before = asyncio.all_tasks()
    with monkeypatch.context() as patched:
        patched.setattr(*target, fail)
        control = ControlPlane(settings)
        with pytest.raises(SchedulerUnreachable) as raised:
            await control.start()
    assert raised.value is error
    left = [task for task in asyncio.all_tasks() - before if not task.done()]
    assert left == [], [task.get_coro() for task in left]
    assert not control.ready
    async with ControlPlane(settings) as again:
        assert again.ready and await again.answering(within_s=5)
        # the lease left by the failed start was given up: this one folds the task events
        await assert_eventually(now(lambda: again.tasks.folding), bool, within=5, what="the tracker's lease")
