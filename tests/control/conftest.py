"""Fixtures of the control plane's tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from control.natsauth import NatsAuth
from control.natscallout import CalloutLogins
from control.natsserver import EmbeddedNats
from control.platform import ControlPlane
from tests.conftest import make_settings, serve_api
from tests.support.nats_users import CalloutUsers, Secured, callout_nats, callout_settings


@pytest.fixture(params=["embedded", "callout"])
async def secured(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Secured]:
    """The platform with its API, on a NATS that requires users: the embedded default's (auth.conf), or one
    configured as nomad/nats.nomad.hcl configures it, whose users the control plane gives by the auth callout."""
    if request.param == "embedded":
        auth = NatsAuth(tmp_path / "nats")
        async with EmbeddedNats(tmp_path / "nats", auth=True) as server:
            auth.server = server
            control = ControlPlane(make_settings(server.url, tmp_path / "data"), nats_auth=auth)
            async with control, serve_api(control) as api:
                yield Secured(api, auth, server.url)
        return
    seed, login = callout_nats(tmp_path / "nats")
    async with EmbeddedNats(tmp_path / "nats", auth=True) as server:
        control = ControlPlane(callout_settings(server.url, tmp_path / "data", seed, login))
        async with control, serve_api(control) as api:
            yield Secured(api, CalloutUsers(CalloutLogins(seed), login), server.url)
