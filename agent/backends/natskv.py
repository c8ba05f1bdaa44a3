"""Killswitch flags in a JetStream KV bucket. A watch hears each write as it is made, on the key's own subject,
and reads its keys again at each heartbeat (every 5 s), for a write made while its connection was away."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Sequence

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from agent.backends.base import (
    Flag,
    FlagKey,
    FlagSnapshot,
    FlagStoreUnavailable,
    Scope,
    read_flags,
    remove_if,
    write_unless_engaged,
)

__all__ = ["BUCKET", "NatsKVFlags", "kv_entries", "kv_entries_of", "kv_key", "kv_keys"]

BUCKET = "caravan_flags"
_DELETED = ("DEL", "PURGE")
_BATCH = 1000  # nats-server's largest batch (and a multi-subject get matches 1,024 subjects at most)
_BATCH_TIMEOUT_S = 5.0
_WRONG_LAST = (10071, 10164)  # JetStream's "wrong last sequence": written meanwhile
_NO_META = (None, None, None)  # an entry's delta, creation time and operation: not read by Caravan


async def kv_entries(kv: KeyValue, pattern: str = ">") -> list[KeyValue.Entry]:
    """Current entries of the keys matching ``pattern`` (see :func:`kv_entries_of`). (nats-py's ``keys()`` and a
    watcher's initial listing can miss keys written meanwhile.)"""
    return await kv_entries_of(kv, [pattern])


async def kv_entries_of(kv: KeyValue, patterns: Sequence[str]) -> list[KeyValue.Entry]:
    """Current entries of the keys matching any of ``patterns``. On a bucket that allows direct gets this is one
    batched request (the server sends the last value of every matching key, then an end-of-batch marker); past
    the server's batch (1,000 keys), the keys are found through the subject index of the bucket's stream and read
    in batches of 1,000 named keys at once. One get per key only on a bucket, or a server, without batched gets."""
    if not patterns:
        return []
    # nats-py has no public accessor for a bucket's stream and JetStream context, nor a batched get
    js, stream, prefix = kv._js, kv._stream, kv._pre
    if kv._direct:
        found = await _last_values(js, stream, prefix, [f"{prefix}{pattern}" for pattern in patterns], kv._name)
        if found is not None:
            return found
    infos = await asyncio.gather(*(js.stream_info(stream, subjects_filter=f"{prefix}{p}") for p in patterns))
    subjects = list(dict.fromkeys(subject for info in infos for subject in info.state.subjects or {}))
    if kv._direct:
        batches = [subjects[i : i + _BATCH] for i in range(0, len(subjects), _BATCH)]
        read = await asyncio.gather(*(_last_values(js, stream, prefix, batch, kv._name) for batch in batches))
        if all(entries is not None for entries in read):
            return [entry for entries in read if entries is not None for entry in entries]
    entries = await asyncio.gather(*(_current(kv, subject[len(prefix) :]) for subject in subjects))
    return [entry for entry in entries if entry is not None and entry.value]


async def kv_keys(kv: KeyValue, pattern: str = ">") -> list[str]:
    """The keys matching ``pattern`` that have a message stored under them, read from the subject index of the
    bucket's stream: no value is sent, so this costs a fraction of reading the entries. A deleted key is among them
    (its delete marker is a message); a purged one is not. The server answers at most 100,000 subjects at a time;
    past that, the next ones are asked for from the offset reached."""
    js, stream, prefix = kv._js, kv._stream, kv._pre
    keys: list[str] = []
    while True:
        request = json.dumps({"subjects_filter": prefix + pattern, "offset": len(keys)}).encode()
        info = await js._api_request(f"{js._prefix}.STREAM.INFO.{stream}", request, timeout=js._timeout)
        subjects = (info.get("state") or {}).get("subjects") or {}
        keys.extend(subject[len(prefix) :] for subject in subjects)
        if not subjects or len(keys) >= info.get("total", 0):
            return keys


async def _last_values(
    js: JetStreamContext, stream: str, prefix: str, subjects: list[str], bucket: str
) -> list[KeyValue.Entry] | None:
    """The batched direct get of the last values of ``subjects`` (wildcards allowed; nats-server 2.11+): None
    when the server will not answer it in one batch."""
    nc = js._nc
    entries: list[KeyValue.Entry] = []
    done: asyncio.Future[list[KeyValue.Entry] | None] = asyncio.get_running_loop().create_future()

    async def on_msg(msg: Msg) -> None:
        if done.done():
            return
        headers = msg.headers or {}
        status = headers.get("Status")
        if status is None:
            if headers.get("KV-Operation") not in _DELETED and msg.data:
                seq = int(headers["Nats-Sequence"])
                entries.append(KeyValue.Entry(bucket, headers["Nats-Subject"][len(prefix) :], msg.data, seq, *_NO_META))
        elif status == "404":  # no key matched
            done.set_result(entries)
        elif status == "204":  # the end of the batch: complete unless the server held some back
            done.set_result(entries if headers.get("Nats-Num-Pending", "0") == "0" else None)
        elif status in ("408", "413", "503"):  # too many keys for one batch; a server without batched gets
            done.set_result(None)
        else:
            done.set_exception(nats.js.errors.APIError(code=int(status), description=headers.get("Description")))

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, cb=on_msg)
    try:
        request = {"multi_last": subjects, "batch": _BATCH}
        await nc.publish(f"{js._prefix}.DIRECT.GET.{stream}", json.dumps(request).encode(), reply=inbox)
        try:
            return await asyncio.wait_for(done, _BATCH_TIMEOUT_S)
        except TimeoutError:  # NATS did not answer, as a request of nats-py's own says it
            raise nats.errors.TimeoutError from None
    finally:
        await sub.unsubscribe()


async def _current(kv: KeyValue, key: str) -> KeyValue.Entry | None:
    """The last entry of ``key``, its delete or purge marker included (with no value); None if never written."""
    try:
        return await kv.get(key)
    except KeyNotFoundError as exc:
        entry: KeyValue.Entry | None = exc.entry
        return entry


def kv_key(key: FlagKey) -> str:
    return ".".join(key.parts())


def _parse(raw_key: str) -> FlagKey | None:
    parts = raw_key.split(".")
    if len(parts) == 2 and parts[:2] == ["killswitch", "all"]:
        return FlagKey(Scope.ALL)
    if len(parts) == 3 and parts[0] == "killswitch" and parts[1] in ("customer", "agent"):
        return FlagKey(Scope(parts[1]), parts[2])
    return None


class NatsKVFlags:
    name = "natskv"

    def __init__(self, nc: NATS, create: bool = False) -> None:
        self._nc = nc
        self._create = create
        self._kv: KeyValue | None = None

    async def start(self) -> None:
        if self._kv is not None:
            raise RuntimeError("flag store already started")
        js = self._nc.jetstream()
        if self._create:
            config = KeyValueConfig(bucket=BUCKET, history=5, storage=StorageType.FILE, direct=True)
            self._kv = await js.create_key_value(config)
            return
        # Bound without asking for the stream's info (nats-py's key_value() does): an agent may not, as that
        # info lists every key, other customers' flags too. The platform makes the bucket with direct gets.
        kv = KeyValue(name=BUCKET, stream=f"KV_{BUCKET}", pre=f"$KV.{BUCKET}.", js=js, direct=True)
        try:
            await _current(kv, kv_key(FlagKey(Scope.ALL)))
        except nats.errors.NoRespondersError as exc:
            raise FlagStoreUnavailable(f"no JetStream KV bucket {BUCKET!r}") from exc
        self._kv = kv

    async def stop(self) -> None:
        self._kv = None

    @property
    def kv(self) -> KeyValue:
        if self._kv is None:
            raise RuntimeError("flag store is not started")
        return self._kv

    async def put(self, flag: Flag) -> None:
        await self.kv.put(kv_key(flag.key), flag.model_dump_json().encode())

    async def delete(self, key: FlagKey) -> None:
        with contextlib.suppress(KeyNotFoundError):
            await self.kv.delete(kv_key(key))

    async def put_unless_engaged(self, flag: Flag) -> bool:
        name, value = kv_key(flag.key), flag.model_dump_json().encode()

        async def write(revision: int) -> bool:
            try:
                await self.kv.update(name, value, last=revision)
                return True
            except KeyWrongLastSequenceError:
                return False

        return await write_unless_engaged(lambda: self._stored(flag.key), write, name)

    async def delete_if(self, key: FlagKey, flag_id: str) -> bool:
        name = kv_key(key)

        async def remove(revision: int) -> bool:
            try:
                await self.kv.delete(name, last=revision)
                return True
            except nats.js.errors.APIError as exc:  # nats-py's delete does not say KeyWrongLastSequenceError
                if exc.err_code in _WRONG_LAST:
                    return False
                raise

        return await remove_if(lambda: self._stored(key), remove, flag_id, name)

    async def _stored(self, key: FlagKey) -> tuple[Flag | None, int]:
        """The flag stored under ``key`` (None: none, or deleted) and the revision to write over it."""
        entry = await _current(self.kv, kv_key(key))  # None: never written (revision 0); no value: a delete marker
        revision = (entry.revision or 0) if entry is not None else 0
        if entry is None or not entry.value:
            return None, revision
        return Flag.decode(key, entry.value, revision), revision

    async def list(self) -> list[Flag]:
        flags: list[Flag] = []
        for entry in await kv_entries(self.kv, "killswitch.>"):
            key = _parse(entry.key)
            if key is not None and entry.value:
                flags.append(Flag.decode(key, entry.value, entry.revision or 0))
        return flags

    async def read(self, keys: Sequence[FlagKey]) -> Sequence[Flag]:
        return await read_flags(self._stored, keys)

    async def watch(self, keys: Sequence[FlagKey], heartbeat: float = 5.0) -> AsyncIterator[FlagSnapshot]:
        while True:
            if not self._nc.is_connected:
                yield FlagSnapshot(reachable=False, error="not connected to NATS")
                await asyncio.sleep(min(heartbeat, 0.5))
                continue
            async for snapshot in self._watch_connected(keys, heartbeat):
                yield snapshot

    async def _watch_connected(self, keys: Sequence[FlagKey], heartbeat: float) -> AsyncIterator[FlagSnapshot]:
        """Watch until the connection drops; then return so that the caller re-reads everything. A write to a
        key is heard on its own subject (a plain subscription, as permissions allow an agent for its three keys:
        no consumer, whose delivery subject would be anyone's to name), then its value read, with its revision."""
        kv = self.kv
        changed: asyncio.Queue[FlagKey] = asyncio.Queue()
        by_subject = {f"{kv._pre}{kv_key(key)}": key for key in keys}
        flags: dict[FlagKey, Flag] = {}
        known: dict[FlagKey, int] = {}  # the newest revision applied, per key
        subs = []

        async def heard(msg: Msg) -> None:
            await changed.put(by_subject[msg.subject])

        def apply(key: FlagKey, entry: KeyValue.Entry | None) -> None:
            if entry is None or (entry.revision or 0) <= known.get(key, 0):
                return  # never written, or not newer than what was applied
            known[key] = entry.revision or 0
            if not entry.value:  # a delete or purge marker
                flags.pop(key, None)
            else:
                flags[key] = Flag.decode(key, entry.value, entry.revision or 0)

        async def read_all() -> None:
            current = await asyncio.gather(*(_current(kv, kv_key(key)) for key in keys))
            for key, found in zip(keys, current, strict=True):
                apply(key, found)

        try:
            for subject in by_subject:
                subs.append(await self._nc.subscribe(subject, cb=heard))
            await self._nc.flush()  # listening before the keys are read: no write falls between
            await read_all()
            yield FlagSnapshot(dict(flags))
            while True:
                try:
                    key = await asyncio.wait_for(changed.get(), timeout=heartbeat)
                except TimeoutError:
                    if not self._nc.is_connected:
                        return
                    # Read again each heartbeat: a write made while the connection was away for a moment (it came
                    # back within the heartbeat) is heard by no subscription, and a direct get that a lagging
                    # replica of a clustered bucket answered may not have had it yet.
                    await read_all()
                    yield FlagSnapshot(dict(flags))
                    continue
                apply(key, await _current(kv, kv_key(key)))
                yield FlagSnapshot(dict(flags))
        finally:
            for sub in subs:
                with contextlib.suppress(nats.errors.Error):
                    await sub.unsubscribe()
