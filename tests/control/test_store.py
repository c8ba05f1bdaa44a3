"""The KV record store: listings stay complete while records change, and updates are compare-and-set."""

from __future__ import annotations

import asyncio

from control.models import Customer
from control.natsio import connect
from control.natsserver import EmbeddedNats
from control.store import AlreadyExists, Repo


async def test_listing_misses_nothing_while_records_are_written(nats_server: EmbeddedNats) -> None:
    jet = await connect(nats_server.url)
    repo = Repo(jet.kv["customers"], Customer)
    for i in range(50):
        await repo.put(f"cu.k{i}", Customer(id=f"k{i}", name="x"))
    writing = True

    async def writer() -> None:
        i = 0
        while writing:
            await repo.put(f"cu.k{i % 50}", Customer(id=f"k{i % 50}", name=str(i)))
            i += 1

    task = asyncio.create_task(writer())
    try:
        sizes = {len(await repo.list("cu.*")) for _ in range(50)}
    finally:
        writing = False
        await task
    assert sizes == {50}
    await repo.delete("cu.k0")
    assert len(await repo.keys("cu.*")) == 49 and await repo.find("k0") is None
    await jet.close()


async def test_concurrent_updates_all_land(nats_server: EmbeddedNats) -> None:
    jet = await connect(nats_server.url)
    repo = Repo(jet.kv["customers"], Customer)
    await repo.create("c", Customer(id="c", name="0"))
    try:
        await repo.create("c", Customer(id="c", name="again"))
        raise AssertionError("create over an existing key succeeded")
    except AlreadyExists:
        pass

    def bump(c: Customer) -> Customer:
        return c.model_copy(update={"name": str(int(c.name) + 1)})

    await asyncio.gather(*(repo.update("c", bump) for _ in range(50)))  # fifty writers on one record
    stored = await repo.get("c")
    assert stored is not None and stored.name == "50"
    await jet.close()
