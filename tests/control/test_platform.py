"""The control plane as a library component: starting one leaves process-wide state to the process."""

from __future__ import annotations

import gc

import pytest

from agent.wire import Wire
from control.platform import ControlPlane
from control.settings import Settings


async def test_starting_a_control_plane_leaves_the_garbage_collector_alone(settings: Settings) -> None:
    frozen = gc.get_freeze_count()
    async with ControlPlane(settings):
        assert gc.get_freeze_count() == frozen  # freezing is for the process entry point (caravan up/serve)


@pytest.mark.parametrize("spin_us", [0.0, 250.0])
async def test_the_control_plane_polls_for_answers_as_its_settings_say(settings: Settings, spin_us: float) -> None:
    """CARAVAN_SPIN_US as the platform's settings read it, for its own connection as for its agents' jobs."""
    async with ControlPlane(settings.model_copy(update={"spin_us": spin_us})) as control:
        assert Wire.of(control.jet.nc).spin_s == spin_us / 1e6
