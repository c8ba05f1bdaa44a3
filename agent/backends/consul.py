"""Killswitch flags in Consul KV, watched with blocking queries (``?index=&wait=``).

Configured like the ``consul`` CLI: ``CONSUL_HTTP_ADDR``, ``CONSUL_HTTP_TOKEN``, ``CONSUL_CACERT``,
``CONSUL_CLIENT_CERT``/``CONSUL_CLIENT_KEY``, ``CONSUL_HTTP_SSL_VERIFY``. py-consul's client is blocking:
every call runs on a thread, and each watched key holds its own thread for its blocking query.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

import consul
import requests

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

__all__ = ["PREFIX", "ConsulBackend", "ConsulFlags", "consul_client", "consul_key"]

PREFIX = "caravan/killswitch"
_ERRORS = (consul.ConsulException, requests.RequestException, OSError)


def consul_key(key: FlagKey) -> str:
    return "/".join(("caravan", *key.parts()))


def _parse(raw_key: str) -> FlagKey | None:
    parts = raw_key.split("/")
    if parts == ["caravan", "killswitch", "all"]:
        return FlagKey(Scope.ALL)
    if len(parts) == 4 and parts[:2] == ["caravan", "killswitch"] and parts[2] in ("customer", "agent") and parts[3]:
        return FlagKey(Scope(parts[2]), parts[3])
    return None


CLIENT_ENV = (
    "CONSUL_HTTP_TOKEN",
    "CONSUL_HTTP_SSL",
    "CONSUL_HTTP_SSL_VERIFY",
    "CONSUL_CACERT",
    "CONSUL_CLIENT_CERT",
    "CONSUL_CLIENT_KEY",
)
"""What :func:`consul_client` reads besides the address: the token and TLS settings an agent's task gets from the
control plane's environment, by the scheduler's secret channel (the address is in its job)."""


def client_env(env: Mapping[str, str]) -> dict[str, str]:
    """The :data:`CLIENT_ENV` variables ``env`` sets."""
    return {name: env[name] for name in CLIENT_ENV if env.get(name)}


def consul_client(env: Mapping[str, str] | None = None) -> consul.Consul:
    """A client from the same environment variables the ``consul`` CLI reads, in ``env`` (this process's
    environment when None): the process's own are not read besides."""
    env = os.environ if env is None else env
    address = env.get("CONSUL_HTTP_ADDR", "127.0.0.1:8500")
    if "://" not in address:
        address = ("https://" if env.get("CONSUL_HTTP_SSL", "").lower() == "true" else "http://") + address
    parts = urlsplit(address)
    verify: bool | str = env.get("CONSUL_HTTP_SSL_VERIFY", "true").lower() != "false"
    if verify and env.get("CONSUL_CACERT"):
        verify = env["CONSUL_CACERT"]
    cert = (env["CONSUL_CLIENT_CERT"], env["CONSUL_CLIENT_KEY"]) if env.get("CONSUL_CLIENT_CERT") else None
    client = consul.Consul(
        host=parts.hostname or "127.0.0.1",
        port=parts.port or (443 if parts.scheme == "https" else 8500),
        scheme=parts.scheme or "http",
        verify=verify,
        cert=cert,
    )
    client.token = env.get("CONSUL_HTTP_TOKEN") or None  # py-consul prefers the process's CONSUL_HTTP_TOKEN to its own
    return client


class ConsulBackend:
    """py-consul's blocking client behind a small thread pool: the base of the Consul flag store and registry."""

    def __init__(self, client: consul.Consul | None = None, env: Mapping[str, str] | None = None) -> None:
        self._client = client or consul_client(env)
        self._pool: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        if self._pool is not None:
            raise RuntimeError(f"{type(self).__name__} already started")
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="consul")

    async def stop(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    async def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        if self._pool is None:
            raise RuntimeError(f"{type(self).__name__} is not started")
        return await asyncio.get_running_loop().run_in_executor(self._pool, lambda: fn(*args, **kwargs))


class ConsulFlags(ConsulBackend):
    name = "consul"

    async def start(self) -> None:
        await super().start()
        try:
            await self._call(self._client.status.leader)
        except _ERRORS as exc:
            raise FlagStoreUnavailable(f"Consul is not reachable: {exc}") from exc

    async def put(self, flag: Flag) -> None:
        ok = await self._call(self._client.kv.put, consul_key(flag.key), flag.model_dump_json())
        if not ok:
            raise FlagStoreUnavailable(f"Consul refused to write {consul_key(flag.key)}")

    async def delete(self, key: FlagKey) -> None:
        await self._call(self._client.kv.delete, consul_key(key))

    async def put_unless_engaged(self, flag: Flag) -> bool:
        name, value = consul_key(flag.key), flag.model_dump_json()

        async def write(index: int) -> bool:  # cas=0: only a new key; else only over that ModifyIndex
            return bool(await self._call(self._client.kv.put, name, value, cas=index))

        return await write_unless_engaged(lambda: self._stored(flag.key), write, name)

    async def delete_if(self, key: FlagKey, flag_id: str) -> bool:
        name = consul_key(key)

        async def remove(index: int) -> bool:
            return bool(await self._call(self._client.kv.delete, name, cas=index))

        return await remove_if(lambda: self._stored(key), remove, flag_id, name)

    async def _stored(self, key: FlagKey) -> tuple[Flag | None, int]:
        """The flag stored under ``key`` (None: none) and its ModifyIndex (0: no key), for a check-and-set."""
        _, entry = await self._call(self._client.kv.get, consul_key(key))
        if entry is None:
            return None, 0
        index = int(entry.get("ModifyIndex", 0))
        return (Flag.decode(key, entry["Value"], index) if entry.get("Value") else None), index

    async def list(self) -> list[Flag]:
        _, entries = await self._call(self._client.kv.get, PREFIX + "/", recurse=True)
        flags = []
        for entry in entries or []:
            key = _parse(entry["Key"])
            if key is not None and entry.get("Value"):
                flags.append(Flag.decode(key, entry["Value"], int(entry.get("ModifyIndex", 0))))
        return flags

    async def read(self, keys: Sequence[FlagKey]) -> Sequence[Flag]:
        return await read_flags(self._stored, keys)

    async def watch(self, keys: Sequence[FlagKey], heartbeat: float = 5.0) -> AsyncIterator[FlagSnapshot]:
        updates: asyncio.Queue[tuple[FlagKey, Flag | None] | tuple[FlagKey, Exception]] = asyncio.Queue()
        pool = ThreadPoolExecutor(max_workers=len(keys), thread_name_prefix="consul-watch")
        loop = asyncio.get_running_loop()
        # Consul answers a quiet key when the wait runs out (plus up to a sixteenth, its jitter): within the
        # heartbeat, so that a quiet store is heard from in time. In milliseconds: whole seconds made a heartbeat
        # under a third of a second a wait of 1 s, and the store seemed unreachable between its answers.
        wait = f"{max(1, round(heartbeat * 1000))}ms"

        def blocking_get(key: FlagKey, index: int) -> tuple[int, Any]:
            result: tuple[int, Any] = self._client.kv.get(consul_key(key), index=index or None, wait=wait)
            return result

        async def follow(key: FlagKey) -> None:
            index = 0
            while True:
                try:
                    new_index, entry = await loop.run_in_executor(pool, blocking_get, key, index)
                except _ERRORS as exc:
                    await updates.put((key, exc))
                    await asyncio.sleep(min(1.0, heartbeat / 2))
                    continue
                # Consul's rules for blocking queries: an index that goes back resets to 0, and the index is made at
                # least 1 (older Consuls answered 0 for some queries; asked again at 0, which does not block, the
                # loop would spin)
                new_index = int(new_index or 0)
                index = max(1, new_index if new_index >= index else 0)
                value = entry.get("Value") if entry else None
                flag = Flag.decode(key, value, int(entry.get("ModifyIndex", 0))) if value else None
                await updates.put((key, flag))

        tasks = [asyncio.create_task(follow(key)) for key in keys]
        flags: dict[FlagKey, Flag] = {}
        started = time.monotonic()
        heard: dict[FlagKey, float] = dict.fromkeys(keys, started)  # when each key last answered
        known: set[FlagKey] = set()  # keys whose value has been read at least once
        error: str | None = None
        try:
            while True:
                try:
                    key, item = await asyncio.wait_for(updates.get(), timeout=heartbeat)
                except TimeoutError:
                    pass
                else:
                    if isinstance(item, Exception):
                        error = f"Consul: {item}"
                        heard[key] = float("-inf")
                    else:
                        heard[key] = time.monotonic()
                        known.add(key)
                        if item is None:
                            flags.pop(key, None)
                        else:
                            flags[key] = item
                reachable = all(time.monotonic() - heard[k] < 2.5 * heartbeat for k in keys)
                if reachable:
                    error = None
                if len(known) == len(keys) or not reachable:
                    yield FlagSnapshot(dict(flags), reachable=reachable, error=error)
        finally:
            for task in tasks:
                task.cancel()
            pool.shutdown(wait=False, cancel_futures=True)
