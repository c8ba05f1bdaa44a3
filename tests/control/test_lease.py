"""The lease by which one control-plane replica at a time does a piece of work (folding the task events): held by
one, handed over when it stops, taken over when it goes silent; the silent one is told when it comes back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from control.lease import Lease
from control.natsio import Jet, connect
from control.natsserver import EmbeddedNats
from tests.support.helpers import Stalling, assert_eventually, now

KEY = "lease.test"


class Replica:
    """A lease as one replica holds it, with what it was told."""

    def __init__(self, kv: KeyValue, ttl_s: float = 2.0, *, starts: bool = True) -> None:
        self.told: list[str] = []
        self.starts = starts
        self.lease = Lease(kv, KEY, self._acquired, self._lost, ttl_s=ttl_s)

    async def _acquired(self) -> None:
        if not self.starts:
            raise ConnectionError("the work cannot start")
        self.told.append("acquired")

    async def _lost(self) -> None:
        self.told.append("lost")


@pytest.fixture
async def jet(nats_server: EmbeddedNats) -> AsyncIterator[Jet]:
    jet = await connect(nats_server.url)
    yield jet
    await jet.close()


async def test_one_replica_holds_the_lease_and_the_next_takes_it_when_it_stops(jet: Jet) -> None:
    first, second = Replica(jet.kv["system"]), Replica(jet.kv["system"])
    await first.lease.start()
    await second.lease.start()
    assert first.told == ["acquired"] and first.lease.valid()
    await asyncio.sleep(3.0)  # longer than the ttl, renewed meanwhile: the standby does not take it
    assert second.told == [] and not second.lease.held

    await first.lease.stop()
    assert first.told == ["acquired", "lost"] and not first.lease.held
    await assert_eventually(now(lambda: second.told), lambda told: told == ["acquired"], what="handed over")
    assert (await jet.kv["system"].get(KEY)).value == second.lease.holder.encode()
    await second.lease.stop()  # the last one: it gives the lease up, and the next to start holds it at once
    with pytest.raises(KeyNotFoundError):
        await jet.kv["system"].get(KEY)
    third = Replica(jet.kv["system"])
    await third.lease.start()
    assert third.told == ["acquired"]
    await third.lease.stop()


async def test_a_holder_gone_silent_is_taken_over_and_told_so_when_it_comes_back(jet: Jet) -> None:
    """A holder whose renewals do not get through is no longer valid after half the ttl, before another can take
    the lease over; once another has, the silent one's next renewal finds it taken, and it is told it lost it."""
    stalling = Stalling(jet.kv["system"])
    silent, standby = Replica(stalling), Replica(jet.kv["system"])  # type: ignore[arg-type]
    await silent.lease.start()
    await standby.lease.start()
    stalling.flowing.clear()
    await assert_eventually(now(silent.lease.valid), lambda valid: not valid, what="the silent holder invalid")
    assert not standby.lease.held  # not yet: the key has not been silent for the whole ttl
    await assert_eventually(now(lambda: standby.told), lambda told: told == ["acquired"], what="taken over")
    assert silent.told == ["acquired"] and silent.lease.held  # it does not know yet

    stalling.flowing.set()
    await assert_eventually(now(lambda: silent.told), lambda told: told == ["acquired", "lost"], what="told")
    assert not silent.lease.held and standby.lease.valid()
    await silent.lease.stop()  # gives up nothing: the lease stays with the standby
    await asyncio.sleep(0.5)  # more than the standby takes to look
    assert standby.told == ["acquired"] and (await jet.kv["system"].get(KEY)).value == standby.lease.holder.encode()
    await standby.lease.stop()


async def test_work_that_cannot_start_gives_the_lease_up(jet: Jet) -> None:
    """A replica that takes the lease and fails to start its work leaves it to the next that looks."""
    failing, other = Replica(jet.kv["system"], starts=False), Replica(jet.kv["system"])
    with pytest.raises(ConnectionError):
        await failing.lease.start()
    assert not failing.lease.held
    await other.lease.start()
    assert other.told == ["acquired"]
    await other.lease.stop()
