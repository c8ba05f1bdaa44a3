"""The killswitch flag contract.

A flag is engaged at one of three scopes — every agent, one customer's agents, one agent — and lives
under a documented key, so that an operator can engage it by hand with the store's own tools:

=========  =====================================  =======================================
scope      Consul KV key                          JetStream KV key (bucket ``caravan_flags``)
=========  =====================================  =======================================
all        ``caravan/killswitch/all``              ``killswitch.all``
customer   ``caravan/killswitch/customer/<id>``    ``killswitch.customer.<id>``
agent      ``caravan/killswitch/agent/<id>``       ``killswitch.agent.<id>``
=========  =====================================  =======================================

The value is the JSON of :class:`Flag`. A value that is not such JSON (``consul kv put
caravan/killswitch/all "maintenance"``) still engages the flag, with the text as its reason; a JSON value
with ``"engaged": false`` does not.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Protocol, TypeVar, runtime_checkable

from pydantic import BaseModel, Field, ValidationError

from agent.protocol import utcnow

__all__ = [
    "CAS_TRIES",
    "Flag",
    "FlagKey",
    "FlagSnapshot",
    "FlagStore",
    "FlagStoreUnavailable",
    "Scope",
    "keys_for_agent",
    "read_flags",
    "remove_if",
    "write_unless_engaged",
]

V = TypeVar("V")


class Scope(StrEnum):
    ALL = "all"
    CUSTOMER = "customer"
    AGENT = "agent"


@dataclass(frozen=True, order=True)
class FlagKey:
    scope: Scope
    target: str | None = None

    def parts(self) -> tuple[str, ...]:
        head = ("killswitch", self.scope.value)
        return head if self.target is None else (*head, self.target)

    @property
    def label(self) -> str:
        """What the flag covers, for people: ``all``, ``customer cu-…``, ``agent ag-…``."""
        return self.scope.value if self.target is None else f"{self.scope.value} {self.target}"


def keys_for_agent(customer_id: str, agent_id: str) -> list[FlagKey]:
    """The three flags that can halt an agent."""
    return [FlagKey(Scope.ALL), FlagKey(Scope.CUSTOMER, customer_id), FlagKey(Scope.AGENT, agent_id)]


class Flag(BaseModel):
    scope: Scope
    target: str | None = None
    engaged: bool = True
    reason: str = ""
    by: str = "operator"
    at: datetime = Field(default_factory=utcnow)
    id: str = Field(default="manual", description="Engagement id; agents echo it in their acknowledgement.")
    hard: bool = False

    @property
    def key(self) -> FlagKey:
        return FlagKey(self.scope, self.target)

    @classmethod
    def decode(cls, key: FlagKey, raw: bytes, revision: int) -> Flag:
        """Read a stored value; anything that is not our JSON engages the flag with the text as its reason."""
        try:
            flag = cls.model_validate_json(raw)
        except ValidationError:
            text = raw.decode("utf-8", "replace").strip()
            try:
                data = json.loads(text)
                engaged = not (isinstance(data, dict) and data.get("engaged") is False)
            except ValueError:
                engaged = True
            flag = cls(scope=key.scope, target=key.target, engaged=engaged, reason=text[:500], id=f"manual-{revision}")
        return flag.model_copy(update={"scope": key.scope, "target": key.target})


@dataclass(frozen=True)
class FlagSnapshot:
    """The flags under watch as the store last reported them; ``reachable`` is False when the store is not."""

    flags: dict[FlagKey, Flag] = field(default_factory=dict)
    reachable: bool = True
    error: str | None = None

    def engaged(self) -> list[Flag]:
        return sorted((f for f in self.flags.values() if f.engaged), key=lambda f: f.key)


class FlagStoreUnavailable(RuntimeError):
    """The flag store could not be reached."""


CAS_TRIES = 20
"""Writers of one flag at once, at most, before a conditional write (:meth:`FlagStore.put_unless_engaged`,
:meth:`FlagStore.delete_if`) gives up."""


async def write_unless_engaged(
    stored: Callable[[], Awaitable[tuple[Flag | None, V]]], write: Callable[[V], Awaitable[bool]], key: str
) -> bool:
    """:meth:`FlagStore.put_unless_engaged` on a store's own check-and-set: ``stored`` reads the flag and the
    version to write over; ``write`` writes only over that version (False: written meanwhile, look again)."""
    for _ in range(CAS_TRIES):
        flag, version = await stored()
        if flag is not None and flag.engaged:
            return False
        if await write(version):
            return True
    raise FlagStoreUnavailable(f"{key} kept changing while a flag was written")


async def remove_if(
    stored: Callable[[], Awaitable[tuple[Flag | None, V]]],
    remove: Callable[[V], Awaitable[bool]],
    flag_id: str,
    key: str,
) -> bool:
    """:meth:`FlagStore.delete_if` on a store's own check-and-set (see :func:`write_unless_engaged`)."""
    for _ in range(CAS_TRIES):
        flag, version = await stored()
        if flag is None or not flag.engaged:
            return True
        if flag.id != flag_id:
            return False
        if await remove(version):
            return True
    raise FlagStoreUnavailable(f"{key} kept changing while a flag was released")


async def read_flags(
    stored: Callable[[FlagKey], Awaitable[tuple[Flag | None, object]]], keys: Sequence[FlagKey]
) -> list[Flag]:
    """:meth:`FlagStore.read` on a store's own read of one key (``stored``: the flag, or None, and its version)."""
    return [flag for flag, _ in await asyncio.gather(*(stored(key) for key in keys)) if flag is not None]


@runtime_checkable
class FlagStore(Protocol):
    """Where killswitch flags live. Implementations are long-lived: ``start()`` once, ``stop()`` idempotent."""

    name: str

    async def start(self) -> None:
        """Connect. Raises :class:`FlagStoreUnavailable` if the store cannot be reached."""

    async def stop(self) -> None:
        """Release connections and end running watches. Idempotent."""

    async def put(self, flag: Flag) -> None:
        """Store ``flag`` under its key (engaging it, or recording ``engaged: false``)."""

    async def delete(self, key: FlagKey) -> None:
        """Remove the flag (released). Removing an absent flag is not an error."""

    async def put_unless_engaged(self, flag: Flag) -> bool:
        """Store ``flag`` only if no engaged flag is stored under its key, checked and written as one (a
        check-and-set): False, and nothing written, if one is."""

    async def delete_if(self, key: FlagKey, flag_id: str) -> bool:
        """Remove the flag under ``key`` only if it is engagement ``flag_id``, checked and removed as one: False,
        and nothing removed, if another engaged flag is stored there (True if none is)."""

    async def list(self) -> list[Flag]:
        """Every stored flag of every scope."""

    async def read(self, keys: Sequence[FlagKey]) -> Sequence[Flag]:
        """The flags stored under ``keys`` now, each read by its key (an agent may read its own keys only)."""

    def watch(self, keys: Sequence[FlagKey], heartbeat: float = 5.0) -> AsyncIterator[FlagSnapshot]:
        """Yield a snapshot of ``keys`` at once, on every change, and at least every ``heartbeat`` seconds
        (with ``reachable=False`` while the store cannot be reached). Changes arrive pushed or by blocking
        query, never by polling faster than the heartbeat."""
