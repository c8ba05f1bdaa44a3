"""The tasks in the order they were made, so that a listing need not read every task record of a customer.

Each task has one key in ``caravan_task_index``: ``<customer>.<created, µs since 1970>.<task>.<agent|team>.<id>``.
A listing reads the keys of the index and of the records (subject indexes, no values), and then only the records
of the page it fills: for ``GET /v1/tasks?limit=20`` twenty records, whatever the number of tasks the customer keeps.

The records stay what is true. A key is written before its record (:meth:`TaskIndex.add`), so a record listed
has its key, unless an older Caravan wrote it (or a test, straight into the bucket): such a record is read once
and its key written then (:meth:`TaskIndex.listing`). A key whose record is gone (taken back, forgotten, or never
written) is not listed, and the retention sweep purges it (:meth:`TaskIndex.forget_orphans`).

A task that ended has a key in ``caravan_task_ended`` as well, ``<customer>.<task>.<completed|failed|cancelled|
killed>``, written once its record says so: as its end is folded in (:meth:`TaskIndex.ended_now`), and by the
first listing of an ended status that reads its record without one (:meth:`TaskIndex.mark_ended`: a write that
failed, a record an older Caravan ended). A task never leaves those statuses, so a listing of one of them need
not read the records of tasks known to have ended with another. Only such a listing reads these keys: a listing
of any status reads as many keys as before.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, NamedTuple, TypeVar

import nats.errors
from nats.js.kv import KeyValue
from pydantic import BaseModel

from agent.backends.natskv import kv_keys
from control.models import TERMINAL_TASK_STATUSES, Task, TaskStatus
from control.store import Repo, purge_keys

__all__ = ["Indexed", "TaskIndex", "created_us"]

log = logging.getLogger("caravan.tasks")

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)
_WRITES_AT_ONCE = 500
_DIGITS = 16  # µs since 1970 until the year 2286: keys sort as the times they name
_ENDED = {status.value: status for status in TERMINAL_TASK_STATUSES}
T = TypeVar("T")


def created_us(at: datetime) -> int:
    """A task's creation time as its index key holds it: whole microseconds since 1970 (a record's own precision),
    so that the index orders tasks exactly as their ``created_at`` does."""
    return ((at if at.tzinfo is not None else at.replace(tzinfo=UTC)) - _EPOCH) // _US


class _Keyed(BaseModel):
    """A task record read for its key alone (its other fields are not validated)."""

    id: str
    customer_id: str
    agent_id: str | None = None
    team_id: str | None = None
    created_at: datetime


class Indexed(NamedTuple):
    """A task as its index key names it; ordered as tasks are listed (oldest first; by id at the same time). A
    tuple: a listing of 20,000 of them is parsed and sorted in a few milliseconds."""

    created_us: int
    task_id: str
    customer_id: str
    given_to: Literal["agent", "team"]
    owner_id: str

    @classmethod
    def of(cls, task: Task | _Keyed) -> Indexed:
        if task.team_id is not None:
            return cls(created_us(task.created_at), task.id, task.customer_id, "team", task.team_id)
        return cls(created_us(task.created_at), task.id, task.customer_id, "agent", task.agent_id or "-")

    @classmethod
    def parse(cls, key: str) -> Indexed | None:
        parts = key.split(".")
        if len(parts) != 5 or not parts[1].isdigit() or parts[3] not in ("agent", "team"):
            return None
        customer_id, at, task_id, given_to, owner_id = parts
        return cls(int(at), task_id, customer_id, "agent" if given_to == "agent" else "team", owner_id)

    @property
    def key(self) -> str:
        return f"{self.customer_id}.{self.created_us:0{_DIGITS}d}.{self.task_id}.{self.given_to}.{self.owner_id}"

    @property
    def record_key(self) -> str:
        return f"{self.customer_id}.{self.task_id}"

    @property
    def agent_id(self) -> str | None:
        return self.owner_id if self.given_to == "agent" else None

    @property
    def team_id(self) -> str | None:
        return self.owner_id if self.given_to == "team" else None


class TaskIndex:
    def __init__(self, kv: KeyValue, ended: KeyValue, records: Repo[Any]) -> None:
        self._kv = kv
        self._ended = ended
        self._records = records

    async def add(self, task: Task | _Keyed) -> None:
        """Index a task about to be stored (before its record: see the module's docstring)."""
        await self._put(Indexed.of(task))

    async def remove(self, task: Task | _Keyed) -> None:
        await self._purge(Indexed.of(task))

    async def listing(self, customer_id: str | None) -> list[Indexed]:
        """The customer's tasks (None: every customer's) that have a record, newest first. Records without a key
        are read and indexed now."""
        indexed, records = await self._keys(customer_id)
        known = {entry.record_key for entry in indexed}
        unindexed = [key for key in records if key not in known]
        if unindexed:
            found = [Indexed.of(task) for task in await self._records.named_as(_Keyed, unindexed)]
            await _in_batches(self._put, found)
            indexed += found
        return sorted((entry for entry in indexed if entry.record_key in records), reverse=True)

    async def ended(self, customer_id: str | None) -> dict[str, TaskStatus]:
        """The statuses of the customer's tasks (None: every customer's) known to have ended, by record key."""
        found = {}
        for key in await kv_keys(self._ended, f"{_owner(customer_id)}.>"):
            record_key, status = _marked(key)
            if (ended := _ENDED.get(status)) is not None:
                found[record_key] = ended
        return found

    async def ended_now(self, task: Task) -> None:
        """Write the key in ``caravan_task_ended`` of a task whose record now says it ended. A write that fails is
        logged and left to the first listing of an ended status that reads the record."""
        try:
            await self._put_ended(_mark(Indexed.of(task).record_key, task.status))
        except nats.errors.Error as exc:
            log.warning(
                "could not mark task %s %s (%r): the next listing of an ended status that reads it will",
                task.id,
                task.status.value,
                exc,
            )

    async def mark_ended(self, read: Mapping[str, Task], known: Mapping[str, TaskStatus]) -> None:
        """Write the key in ``caravan_task_ended`` of each of the tasks ``read`` (by record key) that has ended,
        unless ``known`` (what :meth:`ended` said) has it."""
        ended = [
            _mark(key, task.status)
            for key, task in read.items()
            if task.status in TERMINAL_TASK_STATUSES and key not in known
        ]
        await _in_batches(self._put_ended, ended)

    async def forget_orphans(self, made_before: datetime) -> None:
        """Purge the keys of tasks made before ``made_before`` that have no record (forgotten by the retention
        sweep, or taken back): a task made since may have its key written and its record not yet. And the keys
        in ``caravan_task_ended`` of tasks without a record: a task has its record before it ends."""
        cutoff = created_us(made_before)
        marks = await kv_keys(self._ended, "*.>")  # before the records: a mark is written after its record
        indexed, records = await self._keys(None)
        await _in_batches(self._purge, [e for e in indexed if e.created_us < cutoff and e.record_key not in records])
        await _in_batches(self._purge_ended, [key for key in marks if _marked(key)[0] not in records])

    async def _keys(self, customer_id: str | None) -> tuple[list[Indexed], set[str]]:
        """The customer's index keys (None: every customer's) and the keys of their records, read in this order:
        a task made in between has its key (written first) and maybe a record, or neither."""
        owner = _owner(customer_id)
        indexed = [found for key in await kv_keys(self._kv, f"{owner}.>") if (found := Indexed.parse(key))]
        return indexed, set(await self._records.stored_keys(f"{owner}.*"))

    async def _put(self, entry: Indexed) -> None:
        await self._kv.put(entry.key, b"1")

    async def _purge(self, entry: Indexed) -> None:
        await purge_keys(self._kv, entry.key)

    async def _put_ended(self, key: str) -> None:
        await self._ended.put(key, b"1")

    async def _purge_ended(self, key: str) -> None:
        await purge_keys(self._ended, key)


def _owner(customer_id: str | None) -> str:
    """The first token of a customer's keys (None: every customer's)."""
    return "*" if customer_id is None else customer_id


def _mark(record_key: str, status: TaskStatus) -> str:
    """The key in ``caravan_task_ended`` of the task whose record is at ``record_key``, ended with ``status``."""
    return f"{record_key}.{status.value}"


def _marked(key: str) -> tuple[str, str]:
    """A key of ``caravan_task_ended`` (:func:`_mark`): the record key and the status as written."""
    record_key, _, status = key.rpartition(".")
    return record_key, status


async def _in_batches(write: Callable[[T], Awaitable[None]], entries: list[T]) -> None:
    """``write`` each entry, ``_WRITES_AT_ONCE`` at a time."""
    for start in range(0, len(entries), _WRITES_AT_ONCE):
        await asyncio.gather(*(write(entry) for entry in entries[start : start + _WRITES_AT_ONCE]))
