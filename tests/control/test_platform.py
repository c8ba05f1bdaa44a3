"""The control plane as a library component: starting one leaves process-wide state to the process."""

from __future__ import annotations

import gc

from control.platform import ControlPlane
from control.settings import Settings


async def test_starting_a_control_plane_leaves_the_garbage_collector_alone(settings: Settings) -> None:
    frozen = gc.get_freeze_count()
    async with ControlPlane(settings):
        assert gc.get_freeze_count() == frozen  # freezing is for the process entry point (caravan up/serve)
