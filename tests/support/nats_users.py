"""NATS logins as the tests of NATS's permissions use them (tests/control/test_nats_isolation.py and
test_nats_callout.py): the embedded default's users, or those a NATS configured as nomad/nats.nomad.hcl configures
it gets by the auth callout, and a record of the permission violations NATS reports."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats

from control.natsauth import CONTROL_USER, NatsAuth, NatsCredentials
from control.natscallout import CalloutLogins, issuer_public_key, new_issuer_seed
from control.settings import Settings
from tests.conftest import Api, make_settings
from tests.support.helpers import assert_eventually
from tests.support.nomad_nats import render_nats_users

__all__ = ["CalloutUsers", "Secured", "Violations", "callout_nats", "callout_settings", "connect_as"]


@dataclass
class CalloutUsers:
    """The logins of a NATS whose users the control plane gives by the auth callout, as :class:`NatsAuth` names
    them: the platform's own is the operator's."""

    logins: CalloutLogins
    control_login: NatsCredentials

    def control(self) -> NatsCredentials:
        return self.control_login

    def watcher(self) -> NatsCredentials:
        return self.logins.watcher()

    def agent(self, agent_id: str) -> NatsCredentials:
        return self.logins.agent(agent_id)


@dataclass
class Secured:
    api: Api
    auth: NatsAuth | CalloutUsers
    url: str


def callout_nats(directory: Path, seed: str | None = None) -> tuple[str, NatsCredentials]:
    """Lay out ``directory`` for :class:`EmbeddedNats` with ``auth`` as nomad/nats.nomad.hcl configures NATS: the
    issuer of ``seed`` (by default a new one), and the platform's own login."""
    seed = seed or new_issuer_seed()
    control = NatsCredentials(CONTROL_USER, secrets.token_hex(16))
    directory.mkdir(parents=True)
    variable = {"control_password": control.password, "callout_issuer": issuer_public_key(seed)}
    (directory / "auth.conf").write_text(render_nats_users(variable))
    return seed, control


def callout_settings(url: str, data_dir: Path, seed: str, control: NatsCredentials) -> Settings:
    return make_settings(url, data_dir, nats_user=control.user, nats_password=control.password, nats_callout_seed=seed)


class Violations:
    def __init__(self) -> None:
        self.errors: list[str] = []

    async def record(self, error: Exception) -> None:
        self.errors.append(str(error))

    async def seen(self, fragment: str) -> None:
        async def probe() -> list[str]:
            return self.errors

        fragment = fragment.lower()
        await assert_eventually(
            probe, lambda errors: any(fragment in e.lower() for e in errors), within=10, what=fragment
        )


async def connect_as(secured: Secured, agent_id: str, violations: Violations) -> Any:
    credentials = secured.auth.agent(agent_id)
    return await nats.connect(
        secured.url,
        user=credentials.user,
        password=credentials.password,
        inbox_prefix=f"_INBOX_{agent_id}",
        error_cb=violations.record,
        max_reconnect_attempts=0,
    )
