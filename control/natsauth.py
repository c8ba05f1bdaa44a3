"""NATS credentials and permissions for the embedded NATS server: each agent gets its own user, allowed only its
customer's subjects and its own task queue; the platform's user may do everything but delete the audit log or change
its limits; the operators' watching user (the one ``caravan up`` prints) may only listen to events and the audit.

The server enforces them (``authorization { users = [...] }`` in an included file, reloaded with SIGHUP when an
agent is added or removed). Agent passwords are derived from a secret kept under the data dir, so they never
need storing; they reach the agent as secrets through the scheduler, never through the job spec.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import secrets
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from agent.backends.base import FlagKey, Scope
from agent.backends.natskv import BUCKET as FLAGS_BUCKET
from agent.backends.natskv import kv_key
from agent.protocol import TASKS_STREAM, consumer_name
from control.services.audit import AUDIT_STREAM

__all__ = [
    "CONTROL_USER",
    "WATCH_USER",
    "AgentLogins",
    "DerivedLogins",
    "NatsAuth",
    "NatsCredentials",
    "agent_permissions",
    "agent_user",
    "control_credentials",
    "derived_password",
    "inbox_prefix",
    "watch_permissions",
]

CONTROL_USER = "caravan-control"
WATCH_USER = "caravan-watch"
WATCHED = ("caravan.events.>", "caravan.audit.>", "caravan.broadcast")
"""What the watching user may subscribe to: every event, the audit log as it is written, operators' broadcasts."""
FLAGS_STREAM = f"KV_{FLAGS_BUCKET}"


@dataclass(frozen=True)
class NatsCredentials:
    user: str
    password: str

    def env(self) -> dict[str, str]:
        return {"CARAVAN_NATS_USER": self.user, "CARAVAN_NATS_PASSWORD": self.password}


def derived_password(key: bytes, user: str) -> str:
    """``user``'s password, derived from ``key``: the same key always gives the same one, so none is stored."""
    return hmac.new(key, user.encode(), hashlib.sha256).hexdigest()


def agent_user(agent_id: str) -> str:
    return f"agent-{agent_id}"


def _read_key(key_file: Path) -> bytes:
    return bytes.fromhex(key_file.read_text().strip())


def control_credentials(directory: Path) -> NatsCredentials | None:
    """The platform's user, derived from the secret under ``directory`` without writing anything (for read-only
    commands); None when there is no secret (Caravan does not run that NATS with its own users)."""
    try:
        key = _read_key(directory / "auth.key")
    except FileNotFoundError:
        return None
    return NatsCredentials(CONTROL_USER, derived_password(key, CONTROL_USER))


def inbox_prefix(agent_id: str) -> str:
    """Replies to an agent's requests come to its own inbox subjects, so no agent can read another's."""
    return f"_INBOX_{agent_id}"


def agent_permissions(customer_id: str, agent_id: str) -> dict[str, Any]:
    consumer = consumer_name(agent_id)
    scopes = (FlagKey(Scope.ALL), FlagKey(Scope.CUSTOMER, customer_id), FlagKey(Scope.AGENT, agent_id))
    flag_keys = [kv_key(key) for key in scopes]
    return {
        "publish": {
            "allow": [
                f"caravan.events.{customer_id}.>",
                # team runs of this customer (agent/runtime.py), answers to their requests too: a team's requests
                # are answered inside its run's subjects, and an agent answers nowhere else (no allow_responses,
                # which lets it publish wherever a message it receives says to answer, and it can send itself one)
                f"caravan.rt.{customer_id}.>",
                f"caravan.ctl.{customer_id}.definition.{agent_id}",
                f"$JS.API.CONSUMER.INFO.{TASKS_STREAM}.{consumer}",
                f"$JS.API.CONSUMER.MSG.NEXT.{TASKS_STREAM}.{consumer}",
                f"$JS.ACK.{TASKS_STREAM}.{consumer}.>",
                # the current value of exactly the flags that cover this agent (agent/backends/natskv.py); no
                # stream info (it lists every key) and no consumer (its delivery subject, and the heartbeats sent
                # there, would go wherever the agent said: another customer's subjects too)
                *(f"$JS.API.DIRECT.GET.{FLAGS_STREAM}.$KV.{FLAGS_BUCKET}.{key}" for key in flag_keys),
            ]
        },
        "subscribe": {
            "allow": [
                f"{inbox_prefix(agent_id)}.>",
                f"caravan.rt.{customer_id}.>",
                f"caravan.ctl.{customer_id}.cancel.{agent_id}",
                "caravan.broadcast",
                *(f"$KV.{FLAGS_BUCKET}.{key}" for key in flag_keys),  # a write to a flag that covers it, as made
            ]
        },
    }


def watch_permissions() -> dict[str, Any]:
    return {"publish": {"deny": [">"]}, "subscribe": {"allow": list(WATCHED)}}


def _control_permissions() -> dict[str, dict[str, list[str]]]:
    return {
        "publish": {
            "allow": [">"],
            "deny": [
                f"$JS.API.STREAM.DELETE.{AUDIT_STREAM}",
                f"$JS.API.STREAM.PURGE.{AUDIT_STREAM}",
                f"$JS.API.STREAM.MSG.DELETE.{AUDIT_STREAM}",
                f"$JS.API.STREAM.UPDATE.{AUDIT_STREAM}",  # max_msgs=1 would purge it by another name
            ],
        },
        "subscribe": {"allow": [">"]},
    }


class AgentLogins(Protocol):
    """Where agents' own NATS users come from: :class:`NatsAuth` on the embedded default, the auth callout's
    logins (:class:`control.natscallout.CalloutLogins`) on a NATS of the operator's own."""

    def agent(self, agent_id: str) -> NatsCredentials:
        """The agent's login, which reaches it by the scheduler's secret channel."""
        ...

    def set_agents(self, agents: dict[str, str]) -> None:
        """All agents there are (``{agent id: customer id}``), as the control plane starts."""
        ...

    def add_agent(self, customer_id: str, agent_id: str) -> None:
        """An agent about to be given its login."""
        ...

    def remove_agent(self, agent_id: str) -> None:
        """An agent gone for good: its login lets nobody in any more."""
        ...


class Server(Protocol):
    """The nats-server that reads ``auth.conf`` (:class:`control.natsserver.EmbeddedNats`)."""

    @property
    def pid(self) -> int | None:
        """Its process id while it runs, None while it does not (a server started again reads the file anew)."""
        ...


class DerivedLogins:
    """Logins whose passwords are derived from one key (:func:`derived_password`): none is stored."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def watcher(self) -> NatsCredentials:
        """The operators' user for watching (``nats sub 'caravan.events.>'``): it may subscribe to :data:`WATCHED`
        and publish nothing."""
        return NatsCredentials(WATCH_USER, derived_password(self._key, WATCH_USER))

    def agent(self, agent_id: str) -> NatsCredentials:
        user = agent_user(agent_id)
        return NatsCredentials(user, derived_password(self._key, user))


class NatsAuth(DerivedLogins):
    """Keeps ``auth.conf`` (users and permissions) in step with the agents, and has the server reload it."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / "auth.conf"
        self.server: Server | None = None
        self._agents: dict[str, str] = {}  # agent id -> customer id
        directory.mkdir(parents=True, exist_ok=True)
        key_file = directory / "auth.key"
        if not key_file.exists():
            key_file.touch(mode=0o600)
            key_file.write_text(secrets.token_hex(32))
        super().__init__(_read_key(key_file))
        if not self.path.exists():
            self._write()

    def control(self) -> NatsCredentials:
        return NatsCredentials(CONTROL_USER, derived_password(self._key, CONTROL_USER))

    def set_agents(self, agents: dict[str, str]) -> None:
        """All agents at once (start-up): ``{agent id: customer id}``."""
        self._agents = dict(agents)
        self._apply()

    def add_agent(self, customer_id: str, agent_id: str) -> None:
        if self._agents.get(agent_id) != customer_id:
            self._agents[agent_id] = customer_id
            self._apply()

    def remove_agent(self, agent_id: str) -> None:
        if self._agents.pop(agent_id, None) is not None:
            self._apply()

    def _apply(self) -> None:
        pid = self.server.pid if self.server is not None else None
        if self._write() and pid is not None:
            with contextlib.suppress(ProcessLookupError):  # it exited just now: started again, it reads the file
                os.kill(pid, signal.SIGHUP)  # nats-server reloads its configuration

    def _write(self) -> bool:
        control, watcher = self.control(), self.watcher()
        users = [
            {"user": control.user, "password": control.password, "permissions": _control_permissions()},
            {"user": watcher.user, "password": watcher.password, "permissions": watch_permissions()},
        ]
        for agent_id, customer_id in sorted(self._agents.items()):
            credentials = self.agent(agent_id)
            users.append(
                {
                    "user": credentials.user,
                    "password": credentials.password,
                    "permissions": agent_permissions(customer_id, agent_id),
                }
            )
        # NATS configuration accepts JSON syntax; the file is readable by this user only
        text = "authorization " + json.dumps({"users": users}, indent=1) + "\n"
        if self.path.exists() and self.path.read_text() == text:
            return False
        tmp = self.path.with_suffix(".tmp")
        tmp.touch(mode=0o600)
        tmp.write_text(text)
        tmp.replace(self.path)
        return True
