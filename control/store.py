"""Persistence of Caravan's records in JetStream KV buckets, with compare-and-set updates.

Records of a customer are keyed ``<customer_id>.<id>``, so a customer's lookups cannot reach another
customer's records, and listing a customer's records is a key-filtered scan.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import random
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import nats.errors
from nats.js.errors import BadRequestError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue
from pydantic import BaseModel

from agent.backends.natskv import kv_entries, kv_entries_of, kv_keys
from control.errors import CaravanError
from control.ids import is_plain_id

__all__ = ["AlreadyExists", "Conflict", "LargeRepo", "Repo", "purge_keys"]

M = TypeVar("M", bound=BaseModel)
P = TypeVar("P", bound=BaseModel)
T = TypeVar("T")
_NAMED_BATCH = 1000  # keys named in one batched read (a batched get matches 1,024 subjects at most)


class AlreadyExists(Exception):
    """A create met an existing key."""


class Conflict(CaravanError):
    """A compare-and-set update kept losing to concurrent writers: the caller may retry."""

    status = 503
    code = "busy"
    headers = {"Retry-After": "1"}


class Repo(Generic[M]):
    """Typed records of one model in one KV bucket."""

    def __init__(self, kv: KeyValue, model: type[M]) -> None:
        self._kv = kv
        self._model = model

    async def get(self, key: str) -> M | None:
        found = await self.get_known(key)
        return None if found is None else found[0]

    async def get_known(self, key: str) -> tuple[M, int] | None:
        """The record and its revision (for :meth:`update_known`); None if it is missing or deleted."""
        found = await self._entry(key)
        return None if found is None else (self._model.model_validate_json(found[0]), found[1])

    async def _entry(self, key: str) -> tuple[bytes, int] | None:
        """The key's value and revision; None if it is missing or deleted."""
        try:
            entry = await self._kv.get(key)
        except KeyNotFoundError:
            return None
        return None if entry.value is None else (entry.value, entry.revision or 0)

    async def create(self, key: str, record: M) -> int:
        try:
            return await self._kv.create(key, record.model_dump_json().encode())
        except KeyWrongLastSequenceError as exc:
            raise AlreadyExists(key) from exc

    async def put(self, key: str, record: M) -> int:
        return await self._kv.put(key, record.model_dump_json().encode())

    async def update(self, key: str, change: Callable[[M], M | None], attempts: int = 60) -> M | None:
        """Apply ``change`` to the current record with compare-and-set, retrying on concurrent writes.

        ``change`` returns the new record (``model_copy(update=...)``: it must not change the record it is
        given, which is the stored one as read), or None to leave it as it is. Returns the stored record, or
        None if the key does not exist. Writers that keep colliding back off for a random while, so that fifty
        at once on one record (a customer's quota) all get through; :class:`Conflict` if one still does not.
        """
        changed = await self.change(key, change, attempts)
        return None if changed is None else changed[1]

    async def change(self, key: str, change: Callable[[M], M | None], attempts: int = 60) -> tuple[M, M] | None:
        """:meth:`update`, for a writer that acts on what changed: the record as ``change`` was given it (on the
        write that went through) and the record as stored now (the same one when ``change`` left it)."""
        stored = await self._compare_and_set(key, self._applying(change), attempts)
        return None if stored is None else stored[0]

    async def update_known(
        self, key: str, known: tuple[M, int] | None, change: Callable[[M], M | None], attempts: int = 60
    ) -> tuple[M, int] | None:
        """:meth:`update` from a record at hand and its revision (``known``: what this writer stored last), read
        again only if another writer changed it since. Returns the record as it is now and its revision (None if
        the key does not exist): for the next call. A writer that changes one record over and over (the
        tracker, a task's record at every event) does not read it back and validate it every time."""
        if known is not None:
            record, revision = known
            new = change(record)
            if new is None:
                return known
            try:
                return new, await self._kv.update(key, new.model_dump_json().encode(), last=revision)
            except KeyWrongLastSequenceError:
                pass  # changed meanwhile: read it

        stored = await self._compare_and_set(key, self._applying(change), attempts)
        return None if stored is None else (stored[0][1], stored[1])

    def _applying(self, change: Callable[[M], M | None]) -> Callable[[bytes], tuple[tuple[M, M], bytes | None]]:
        """``change`` on a stored record's bytes (for :meth:`_compare_and_set`): the record before and after, and
        the bytes to write (None: unchanged)."""

        def apply(raw: bytes) -> tuple[tuple[M, M], bytes | None]:
            current = self._model.model_validate_json(raw)
            new = change(current)
            return ((current, current), None) if new is None else ((current, new), new.model_dump_json().encode())

        return apply

    async def patch(
        self, key: str, change: Callable[[dict[str, Any]], dict[str, Any] | None], attempts: int = 60
    ) -> bool | None:
        """:meth:`update` on the stored JSON itself, for hot paths that set a field or two (an agent's status
        on every killswitch acknowledgement): no model validation and no deep copy. ``change`` must keep the
        record valid. Returns None if the key does not exist, else whether the record changed."""

        def apply(raw: bytes) -> tuple[bool, bytes | None]:
            new = change(json.loads(raw))
            return (False, None) if new is None else (True, json.dumps(new, separators=(",", ":")).encode())

        stored = await self._compare_and_set(key, apply, attempts)
        return None if stored is None else stored[0]

    async def _compare_and_set(
        self, key: str, apply: Callable[[bytes], tuple[T, bytes | None]], attempts: int
    ) -> tuple[T, int] | None:
        """``apply``'s result and the record's revision after it; None if the key does not exist."""
        for attempt in range(attempts):
            found = await self._entry(key)
            if found is None:
                return None
            value, revision = found
            result, new = apply(value)
            if new is None:
                return result, revision
            try:
                return result, await self._kv.update(key, new, last=revision)
            except KeyWrongLastSequenceError:
                await asyncio.sleep(random.uniform(0, 0.001 * min(attempt, 20)))
        raise Conflict(f"{key} is being changed by many writers at once; retry")

    async def delete(self, key: str) -> None:
        await self._kv.delete(key)

    async def purge(self, pattern: str) -> None:
        """Remove the records matching ``pattern`` for good, leaving no marker (:func:`purge_keys`)."""
        await purge_keys(self._kv, pattern)

    async def keys(self, pattern: str = ">") -> list[str]:
        """Keys of live records matching a NATS subject pattern (``cu-1.*``)."""
        return [e.key for e in await kv_entries(self._kv, pattern) if e.value]

    async def stored_keys(self, pattern: str = ">") -> list[str]:
        """Keys matching ``pattern`` with anything stored, a deleted record's marker included, read without their
        values (:func:`kv_keys`): many times cheaper than :meth:`keys` on a large bucket."""
        return await kv_keys(self._kv, pattern)

    async def items(self, pattern: str = ">") -> builtins.list[tuple[str, M]]:
        """Keys and records, read in one pass over the bucket."""
        return [
            (e.key, self._model.model_validate_json(e.value)) for e in await kv_entries(self._kv, pattern) if e.value
        ]

    async def list(self, pattern: str = ">") -> list[M]:
        return await self.list_as(self._model, pattern)

    async def list_as(self, model: type[P], pattern: str = ">") -> builtins.list[P]:
        """The records read as ``model``, a few of their fields (pydantic ignores the rest): a listing on a
        hot path that needs no full validation of every record."""
        return [model.model_validate_json(e.value) for e in await kv_entries(self._kv, pattern) if e.value]

    async def named_as(self, model: type[P], keys: Sequence[str]) -> builtins.list[P]:
        """The records of ``keys`` (plain keys, no wildcards) that exist, read as ``model``, in batched reads of
        1,000 keys."""
        batches = [keys[i : i + _NAMED_BATCH] for i in range(0, len(keys), _NAMED_BATCH)]
        read = await asyncio.gather(*(kv_entries_of(self._kv, batch) for batch in batches))
        return [model.model_validate_json(e.value) for entries in read for e in entries if e.value]

    async def owned(self, customer_id: str | None, record_id: str) -> M | None:
        """A customer's record ``<customer>.<id>`` (another tenant's ids are simply not found), or, for
        ``customer_id`` None (an admin), whichever customer's it is (:meth:`find`). None for an id that is not a
        plain one."""
        if customer_id is None:
            found = await self.find(record_id)
            return found[1] if found else None
        return await self.get(f"{customer_id}.{record_id}") if is_plain_id(record_id) else None

    async def find(self, record_id: str) -> tuple[str, M] | None:
        """Find a record by the last part of its key, whichever customer owns it (admin lookups). None for an id
        that is not a plain one: ``*`` or ``>`` would match any record."""
        if not is_plain_id(record_id):
            return None
        found = await self.items(f"*.{record_id}")
        return found[0] if found else None


_MANIFEST = b'{"caravan_parts":'
_TOO_BIG = 10054  # JetStream's error code for a message over the stream's max_msg_size
_PART_MARGIN = 1024  # room in a message for its subject and headers


class LargeRepo(Repo[M]):
    """Records that may outgrow a stored value (a NATS server's ``max_payload``, 1 MB unless configured, or the
    bucket's own limit): such a record is stored in parts under ``<key>.part.<write>.<n>``, and its key holds a
    manifest naming them, written once every part is stored (a reader sees the old record or the new one, whole).
    ``get``, ``put`` and ``delete`` only: a record in parts is not compare-and-set.

    The parts a record replaces are deleted when it is replaced. Deleting a record deletes every part stored
    under its key, also those of a writer that died between its parts and its manifest (parts nobody names)."""

    def __init__(self, kv: KeyValue, model: type[M]) -> None:
        super().__init__(kv, model)
        # key: the parts it names now (their write and count; None: none), as this process last read or wrote it
        self._names: dict[str, _Parts | None] = {}
        self._part_size: int | None = None  # read from the server and the bucket once, at the first record in parts

    async def get_known(self, key: str) -> tuple[M, int] | None:
        found = await self._entry(key)
        if found is None:
            self._names[key] = None
            return None
        raw, revision = found
        parts = self._names[key] = _parts_named(raw)
        if parts is not None:
            raw = await self._joined(key, parts)
        return self._model.model_validate_json(raw), revision

    async def put(self, key: str, record: M) -> int:
        if key not in self._names:  # written by another process, perhaps in parts: which ones it names
            found = await self._entry(key)
            self._names[key] = None if found is None else _parts_named(found[0])
        data = record.model_dump_json().encode()
        try:
            revision = await self._kv.put(key, data)
        except (nats.errors.MaxPayloadError, BadRequestError) as exc:
            if not _too_big(exc):
                raise
            return await self._put_parts(key, data)
        await self._forget_parts(key, self._names.get(key))
        self._names[key] = None
        return revision

    async def delete(self, key: str) -> None:
        await self._kv.delete(key)
        self._names.pop(key, None)
        await self.purge(f"{key}.part.>")  # named or not (nobody watches parts: a manifest names them)

    async def _put_parts(self, key: str, data: bytes) -> int:
        try:
            parts = await self._store_parts(key, data)
        except (nats.errors.MaxPayloadError, BadRequestError) as exc:
            if not _too_big(exc):
                raise
            self._part_size = None  # the bucket's limit went down since it was read (an operator's change)
            parts = await self._store_parts(key, data)
        manifest = {"caravan_parts": {"write": parts.write, "count": parts.count, "size": len(data)}}
        revision = await self._kv.put(key, json.dumps(manifest).encode())
        await self._forget_parts(key, self._names.get(key))
        self._names[key] = parts
        return revision

    async def _store_parts(self, key: str, data: bytes) -> _Parts:
        """Store ``data`` in parts of the size the bucket takes now (read once, and again after a refusal); a
        write refused in part leaves none of its parts."""
        if self._part_size is None:
            limit = self._kv._js._nc.max_payload  # nats-py exposes no bucket's stream config nor its JS context
            stream_limit = (await self._kv._js.stream_info(self._kv._stream)).config.max_msg_size or -1
            self._part_size = max((min(limit, stream_limit) if stream_limit > 0 else limit) - _PART_MARGIN, 1024)
        size = self._part_size
        chunks = [data[i : i + size] for i in range(0, len(data), size)]
        parts = _Parts(secrets.token_hex(6), len(chunks))
        stored = await asyncio.gather(
            *(self._kv.put(parts.key(key, n), chunk) for n, chunk in enumerate(chunks)), return_exceptions=True
        )
        refused = next((result for result in stored if isinstance(result, BaseException)), None)
        if refused is not None:
            await self.purge(parts.key(key, ">"))
            raise refused
        return parts

    async def _joined(self, key: str, parts: _Parts) -> bytes:
        read = {e.key: e.value for e in await kv_entries(self._kv, parts.key(key, "*"))}
        chunks = [read.get(parts.key(key, n)) for n in range(parts.count)]
        if not all(chunks):
            raise Conflict(f"{key}: {sum(1 for c in chunks if c)} of its {parts.count} parts are stored")
        return b"".join(chunk or b"" for chunk in chunks)

    async def _forget_parts(self, key: str, parts: _Parts | None) -> None:
        if parts is not None:
            with contextlib.suppress(nats.errors.Error):  # the new record is stored: a part left over is harmless
                await self.purge(parts.key(key, ">"))


@dataclass(frozen=True)
class _Parts:
    """The parts of one write of a record: ``<key>.part.<write>.<n>`` for n below ``count``."""

    write: str
    count: int

    def key(self, key: str, n: int | str) -> str:
        return f"{key}.part.{self.write}.{n}"


async def purge_keys(kv: KeyValue, pattern: str) -> None:
    """Remove every key of ``kv`` matching ``pattern`` (a KV key pattern) with one request: a stream purge by
    subject, not a KV purge per key, which would leave a marker for each. Watchers of those keys see nothing."""
    await kv._js.purge_stream(kv._stream, subject=kv._pre + pattern)


def _too_big(exc: Exception) -> bool:
    """Whether a put failed for its size: over the server's max_payload, or the stream's max_msg_size."""
    return isinstance(exc, nats.errors.MaxPayloadError) or (
        isinstance(exc, BadRequestError) and exc.err_code == _TOO_BIG
    )


def _parts_named(raw: bytes) -> _Parts | None:
    """The parts a stored value names; None for a record stored whole."""
    if not raw.startswith(_MANIFEST):
        return None
    manifest = json.loads(raw)["caravan_parts"]
    return _Parts(str(manifest["write"]), int(manifest["count"]))
