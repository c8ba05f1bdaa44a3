"""Flag stores, the same tests for each: JetStream KV (real NATS) and Consul (the API double, and a real
Consul when CONSUL_HTTP_ADDR is set)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import nats
import pytest
from consul.exceptions import BadRequest

from agent.backends import natskv
from agent.backends.base import Flag, FlagKey, FlagSnapshot, FlagStore, Scope
from agent.backends.consul import ConsulFlags, consul_client
from agent.backends.natskv import NatsKVFlags
from control.natsserver import EmbeddedNats
from tests.conftest import CONSUL_KINDS, consul_env
from tests.support.consul_double import ConsulDouble
from tests.support.helpers import assert_eventually


@dataclass
class Backend:
    store: FlagStore
    consul_env: dict[str, str] | None = None


MADE: set[str] = set()
"""The customers and agents the tests made up: a real Consul's flags of others (an operator's) are not theirs to
remove."""


@pytest.fixture(params=["natskv", *CONSUL_KINDS])
async def backend(request: pytest.FixtureRequest, nats_server: EmbeddedNats) -> AsyncIterator[Backend]:
    if request.param == "natskv":
        nc = await nats.connect(nats_server.url)
        flags: FlagStore = NatsKVFlags(nc, create=True)
        await flags.start()
        yield Backend(flags)
        await flags.stop()
        await nc.close()
        return
    with consul_env(request.param) as env:
        flags = ConsulFlags(env=env)
        await flags.start()
        yield Backend(flags, env)
        for flag in await flags.list():
            if flag.target in MADE:
                await flags.delete(flag.key)
        await flags.stop()


def unique(prefix: str = "cu") -> str:
    made = f"{prefix}-{uuid.uuid4().hex[:12]}"
    MADE.add(made)
    return made


class Watch:
    def __init__(self, store: FlagStore, keys: list[FlagKey]) -> None:
        self.latest: FlagSnapshot | None = None
        self._iter = store.watch(keys, heartbeat=1.0)

    async def next(self) -> FlagSnapshot:
        self.latest = await self._iter.__anext__()
        return self.latest

    async def close(self) -> None:
        await self._iter.aclose()  # type: ignore[attr-defined]


async def test_put_list_delete(backend: Backend) -> None:
    store = backend.store
    customer = unique()
    flag = Flag(scope=Scope.CUSTOMER, target=customer, reason="billing dispute", by="admin:1", id="e1", hard=True)
    await store.put(flag)
    listed = [f for f in await store.list() if f.key == flag.key]
    assert listed == [flag]
    others = [FlagKey(Scope.CUSTOMER, unique()), FlagKey(Scope.AGENT, unique("ag"))]  # none stored: not read
    assert await store.read([*others, flag.key]) == [flag]
    await store.delete(flag.key)
    await store.delete(flag.key)  # releasing twice is fine
    assert [f for f in await store.list() if f.key == flag.key] == []
    assert await store.read([*others, flag.key]) == []


async def test_conditional_writes_leave_another_engagement_alone(backend: Backend) -> None:
    """What the token budget writes (control.services.budget): its flag only where none is engaged, and its
    release only of its own engagement, each checked and done as one."""
    store = backend.store
    key = FlagKey(Scope.CUSTOMER, unique())
    ours = Flag(scope=key.scope, target=key.target, reason="budget", by="system:token-budget", id="budget-1")
    theirs = Flag(scope=key.scope, target=key.target, reason="fraud", by="admin:1", id="operator-1")

    assert await store.put_unless_engaged(ours)  # nothing there
    assert not await store.put_unless_engaged(theirs)  # ours is engaged: nothing written
    assert [f.id for f in await store.list() if f.key == key] == ["budget-1"]

    await store.put(theirs)  # an operator's engagement over it
    assert not await store.delete_if(key, "budget-1")  # not ours any more: nothing removed
    assert [f.id for f in await store.list() if f.key == key] == ["operator-1"]
    assert await store.delete_if(key, "operator-1")
    assert [f for f in await store.list() if f.key == key] == []
    assert await store.delete_if(key, "operator-1")  # released already

    assert await store.put_unless_engaged(ours)  # a key released (deleted) before
    await store.put(ours.model_copy(update={"engaged": False}))  # a flag written as released
    assert await store.put_unless_engaged(theirs)
    assert [f.id for f in await store.list() if f.key == key] == ["operator-1"]


async def test_watch_sees_the_current_flags_then_every_change(backend: Backend) -> None:
    store = backend.store
    customer, agent = unique(), unique("ag")
    keys = [FlagKey(Scope.CUSTOMER, customer), FlagKey(Scope.AGENT, agent)]
    await store.put(Flag(scope=Scope.AGENT, target=agent, reason="before", id="e0"))
    watch = Watch(store, keys)
    try:
        first = await watch.next()
        assert first.reachable and [f.id for f in first.engaged()] == ["e0"]
        await store.put(Flag(scope=Scope.CUSTOMER, target=customer, reason="now", id="e1"))
        changed = await assert_eventually(watch.next, lambda s: len(s.engaged()) == 2, what="second flag seen")
        assert {f.reason for f in changed.engaged()} == {"before", "now"}
        await store.delete(FlagKey(Scope.AGENT, agent))
        await store.delete(FlagKey(Scope.CUSTOMER, customer))
        await assert_eventually(watch.next, lambda s: s.engaged() == [], what="released")
        # flags of other customers and agents are not part of this watch
        await store.put(Flag(scope=Scope.CUSTOMER, target=unique(), reason="someone else", id="x"))
        quiet = await watch.next()
        assert quiet.engaged() == []
    finally:
        await watch.close()


async def test_a_quiet_store_stays_reachable_under_a_short_heartbeat(backend: Backend) -> None:
    """An agent whose grace is short watches with a short heartbeat (agent.killswitch: a third of the grace): a
    store with nothing to say must still answer within it, or the agent halts (fail safe) while all is well.
    Consul's blocking query once waited at least a whole second, whatever the heartbeat."""
    loop = asyncio.get_running_loop()
    watch = backend.store.watch([FlagKey(Scope.AGENT, unique("ag"))], heartbeat=0.3)
    seen: list[FlagSnapshot] = []
    try:
        until = loop.time() + 2.5  # several of the heartbeat's windows, with nothing changing
        while loop.time() < until:
            seen.append(await watch.__anext__())
    finally:
        await watch.aclose()  # type: ignore[attr-defined]
    assert seen and all(snapshot.reachable for snapshot in seen), [s.error for s in seen if not s.reachable]


async def test_a_write_the_watch_did_not_read_at_once_is_read_within_a_heartbeat(
    nats_server: EmbeddedNats, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An agent hears a write to one of its flags on the key's subject, then reads the key. A read that finds the
    write not there yet (a lagging replica of a clustered bucket), or a write made while its connection was away
    for a moment, is not heard again: the watch reads its keys again each heartbeat, so the agent halts within one
    rather than at the next write, whenever that comes."""
    nc = await nats.connect(nats_server.url)
    store = NatsKVFlags(nc, create=True)
    await store.start()
    stale = asyncio.Event()
    read = natskv._current

    async def lagging(kv: Any, key: str) -> Any:
        if stale.is_set():  # the first read after the write finds what was there before it
            stale.clear()
            return None
        return await read(kv, key)

    monkeypatch.setattr(natskv, "_current", lagging)
    agent = unique("ag")
    watch = store.watch([FlagKey(Scope.AGENT, agent)], heartbeat=0.3)
    try:
        assert (await watch.__anext__()).engaged() == []
        stale.set()
        await store.put(Flag(scope=Scope.AGENT, target=agent, reason="stop", id="e1"))
        seen = await assert_eventually(watch.__anext__, lambda s: s.engaged() != [], what="the flag read", within=5)
        assert [f.reason for f in seen.engaged()] == ["stop"] and not stale.is_set()
    finally:
        await watch.aclose()  # type: ignore[attr-defined]
        await store.stop()
        await nc.close()


async def test_values_written_by_hand_are_honoured(backend: Backend, nats_server: EmbeddedNats) -> None:
    store = backend.store
    customer, released = unique(), unique("ag")
    key = FlagKey(Scope.CUSTOMER, customer)
    if backend.consul_env is not None:
        # what `consul kv put caravan/killswitch/customer/<id> "maintenance window"` sends
        kv = consul_client(backend.consul_env).kv
        assert kv.put(f"caravan/killswitch/customer/{customer}", b"maintenance window")
        assert kv.put(f"caravan/killswitch/agent/{released}", b'{"engaged": false}')
    else:
        # what `nats kv put caravan_flags killswitch.customer.<id> "maintenance window"` does
        nc = await nats.connect(nats_server.url)
        kv = await nc.jetstream().key_value("caravan_flags")
        await kv.put(f"killswitch.customer.{customer}", b"maintenance window")
        await kv.put(f"killswitch.agent.{released}", b'{"engaged": false}')
        await nc.close()
    flags = {f.key: f for f in await store.list()}
    assert flags[key].engaged and flags[key].reason == "maintenance window"
    assert not flags[FlagKey(Scope.AGENT, released)].engaged
    watch = Watch(store, [key])
    try:
        assert [f.reason for f in (await watch.next()).engaged()] == ["maintenance window"]
    finally:
        await watch.close()


async def test_consul_outage_is_reported_as_unreachable(consul_double: ConsulDouble) -> None:
    store = ConsulFlags(env={"CONSUL_HTTP_ADDR": consul_double.address})
    await store.start()
    watch = Watch(store, [FlagKey(Scope.ALL)])
    try:
        assert (await watch.next()).reachable
        with consul_double.down():
            down = await assert_eventually(watch.next, lambda s: not s.reachable, what="unreachable")
            assert down.error and "No cluster leader" in down.error
        await assert_eventually(watch.next, lambda s: s.reachable, what="reachable again")
    finally:
        await watch.close()
        await store.stop()


async def test_a_consul_that_answers_index_0_is_asked_with_a_blocking_query(consul_double: ConsulDouble) -> None:
    """Older Consuls answered some blocking queries with ``X-Consul-Index: 0`` (Consul's docs on blocking queries:
    a client should make its index at least 1 after each answer): asked again at 0, which does not block, the watch
    would spin on the server as fast as it answers."""
    consul_double.least_index = 0  # such a Consul's answer for a key not written yet
    store = ConsulFlags(env={"CONSUL_HTTP_ADDR": consul_double.address})
    await store.start()
    watch = Watch(store, [FlagKey(Scope.ALL)])
    try:
        assert (await watch.next()).engaged() == []
        await store.put(Flag(scope=Scope.ALL, reason="maintenance", id="e1"))
        await assert_eventually(watch.next, lambda s: [f.id for f in s.engaged()] == ["e1"], what="flag seen")
    finally:
        await watch.close()
        await store.stop()
    reads = [
        query
        for method, path, query in consul_double.requests
        if (method, path) == ("GET", "/v1/kv/caravan/killswitch/all")
    ]
    assert "index" not in reads[0]
    assert [query.get("index") for query in reads[1:] if int(query.get("index") or 0) < 1] == []


@pytest.mark.parametrize("kind", CONSUL_KINDS)
def test_consul_answers_a_read_of_a_flag_with_that_flags_own_index(kind: str) -> None:
    """What a flag's watch is answered (``KVS.Get`` and ``blockingquery.Query`` in hashicorp/consul): a key's read
    carries its own ``ModifyIndex``, which a write to another key (or the same value written again) leaves as it
    is, so that a blocking read of it answers with the index it was given; a missing key's, the KV table's. A wait
    Go cannot parse is a 400, not the default five minutes."""
    with consul_env(kind) as env:
        kv = consul_client(env).kv
        flag, other, missing = (f"caravan/killswitch/agent/{unique('ag')}" for _ in range(3))
        try:
            assert kv.put(flag, b"maintenance")
            index, entry = kv.get(flag)
            assert entry is not None and int(index) == entry["ModifyIndex"]
            assert kv.put(other, b"elsewhere")
            assert kv.put(flag, b"maintenance")  # the same value again: not a change
            after, entry = kv.get(flag, index=index, wait="300ms")
            assert (after, entry["ModifyIndex"]) == (index, int(index))
            table, _ = kv.get(missing)
            assert int(table) >= kv.get(other)[1]["ModifyIndex"] > int(index)
            for wait, refused in (("5", "Invalid wait time"), ("5sec", "Invalid wait time")):
                with pytest.raises(BadRequest, match=refused):
                    kv.get(flag, index=index, wait=wait)
        finally:
            kv.delete(flag)
            kv.delete(other)


async def test_a_stopped_nats_is_reported_as_unreachable(tmp_path) -> None:  # type: ignore[no-untyped-def]
    async with EmbeddedNats(tmp_path / "n") as server:
        nc = await nats.connect(server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
        store = NatsKVFlags(nc, create=True)
        await store.start()
        watch = Watch(store, [FlagKey(Scope.ALL)])
        assert (await watch.next()).reachable
        await server.stop()
        await assert_eventually(watch.next, lambda s: not s.reachable, what="unreachable")
        await watch.close()
        await nc.close()


@pytest.mark.parametrize("kind", CONSUL_KINDS)
async def test_a_consul_client_uses_the_token_of_the_environment_it_is_given(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client built from an environment mapping sends that mapping's token, whatever this process's
    CONSUL_HTTP_TOKEN says (py-consul would prefer the process's)."""
    with consul_env(kind) as env:
        monkeypatch.setenv("CONSUL_HTTP_TOKEN", str(uuid.uuid4()))  # a token Consul does not know
        store = ConsulFlags(env=env)
        await store.start()
        try:
            flag = Flag(scope=Scope.CUSTOMER, target=unique(), reason="token check", id="t1")
            await store.put(flag)
            assert [f.id for f in await store.list() if f.key == flag.key] == ["t1"]
            await store.delete(flag.key)
        finally:
            await store.stop()
