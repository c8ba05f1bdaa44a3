"""The KV record store: listings stay complete while records change, and updates are compare-and-set."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import nats
import pytest
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig
from nats.js.errors import BucketNotFoundError
from nats.js.kv import KeyValue

from agent.backends.natskv import kv_entries
from control.models import Customer
from control.natsio import BUCKETS, CONSUMER_LIMIT, connect
from control.natsserver import EmbeddedNats
from control.store import AlreadyExists, LargeRepo, Repo
from tests.support.helpers import assert_eventually, nats_connect, small_messages


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


async def test_listing_is_complete_past_one_batch_and_skips_deleted(nats_server: EmbeddedNats) -> None:
    """A listing is one batched read up to the server's batch size (1,000 keys); past it, batched reads of the
    keys the bucket's subject index names."""
    jet = await connect(nats_server.url)
    repo = Repo(jet.kv["customers"], Customer)
    await asyncio.gather(*(repo.put(f"cu.k{i}", Customer(id=f"k{i}", name=str(i))) for i in range(1100)))
    await asyncio.gather(*(repo.put(f"cu.k{i}", Customer(id=f"k{i}", name=f"v2-{i}")) for i in range(0, 1100, 7)))
    await repo.delete("cu.k1")
    other = Repo(jet.kv["keys"], Customer)
    await other.put("cu.elsewhere", Customer(id="x", name="x"))
    for pattern, count in (("cu.*", 1099), ("cu.k10", 1), ("nothing.*", 0)):  # 1099 keys: past one batch
        assert len(await repo.list(pattern)) == count, pattern
    everything = {c.id: c.name for c in await repo.list("cu.*")}
    assert "k1" not in everything and "x" not in everything
    assert everything["k7"] == "v2-7" and everything["k8"] == "8"  # the last value of each key
    await jet.close()


async def test_new_buckets_are_tuned_and_not_opened_again(nats_server: EmbeddedNats) -> None:
    watcher = await nats_connect(nats_server.url)
    calls: dict[str, list[str]] = {}

    async def on_api(msg: nats.aio.msg.Msg) -> None:  # every JetStream API request, as the server routes it
        _, _, kind, verb, stream = msg.subject.split(".", 4)
        calls.setdefault(stream, []).append(f"{kind}.{verb}")

    await watcher.subscribe("$JS.API.STREAM.*.*", cb=on_api)
    await watcher.flush()
    jet = await connect(nats_server.url)
    await watcher.flush()  # the server routed each request here before it answered it
    made = {stream: list(requests) for stream, requests in calls.items()}
    for bucket in BUCKETS:
        stream = f"KV_caravan_{bucket}"
        config = (await jet.js.stream_info(stream)).config
        assert (config.max_consumers, config.allow_direct) == (CONSUMER_LIMIT, True), bucket
        # made by nats-py without the limit, then updated; the KeyValue from the creation already reads directly
        assert made[stream][-1] == "STREAM.UPDATE", (bucket, made[stream])
        await jet.kv[bucket].put("probe", bucket.encode())
        assert (await jet.kv[bucket].get("probe")).value == bucket.encode()
    await jet.close()
    await watcher.close()


async def test_a_replica_that_finds_a_bucket_made_by_another_after_it_looked_opens_it(
    nats_server: EmbeddedNats, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = await connect(nats_server.url)  # made and tuned every bucket
    await first.kv["agents"].put("probe", b"kept")
    looked: set[str] = set()
    key_value = JetStreamContext.key_value

    async def not_there_yet(self: JetStreamContext, bucket: str) -> KeyValue:
        if bucket not in looked:  # the second replica looked before the first made it
            looked.add(bucket)
            raise BucketNotFoundError
        return await key_value(self, bucket)

    monkeypatch.setattr(JetStreamContext, "key_value", not_there_yet)
    second = await connect(nats_server.url)  # nats-py refuses to make a bucket that exists with another config
    assert (await second.kv["agents"].get("probe")).value == b"kept"
    assert looked == {f"caravan_{bucket}" for bucket in BUCKETS}
    await second.close()
    await first.close()


async def test_buckets_of_an_older_caravan_are_upgraded_to_direct_reads(nats_server: EmbeddedNats) -> None:
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    old = await js.create_key_value(KeyValueConfig(bucket="caravan_customers", history=1, direct=False))
    await old.put("cu.a", Customer(id="a", name="made before the upgrade").model_dump_json().encode())
    jet = await connect(nats_server.url)
    assert (await js.stream_info("KV_caravan_customers")).config.allow_direct
    listed = await Repo(jet.kv["customers"], Customer).list("cu.*")
    assert [c.name for c in listed] == ["made before the upgrade"]
    await jet.close()
    await nc.close()


async def test_patches_of_the_stored_json_are_compare_and_set_and_stay_readable(nats_server: EmbeddedNats) -> None:
    jet = await connect(nats_server.url)
    repo = Repo(jet.kv["customers"], Customer)
    await repo.create("c", Customer(id="c", name="0"))

    def bump(record: dict[str, object]) -> dict[str, object]:
        return {**record, "name": str(int(str(record["name"])) + 1)}

    assert all(await asyncio.gather(*(repo.patch("c", bump) for _ in range(30))))
    stored = await repo.get("c")
    assert stored is not None and stored.name == "30"  # every patch landed, and the record still validates
    assert await repo.patch("c", lambda record: None) is False
    assert await repo.patch("missing", bump) is None and await repo.get("missing") is None
    await jet.close()


async def test_a_record_too_big_for_a_stored_value_is_stored_in_parts_and_read_whole(nats_server: EmbeddedNats) -> None:
    """LargeRepo (a team's saved state): a record over the bucket's limit is stored in parts behind a manifest,
    read back whole; a smaller one replacing it, or its deletion, leaves none of its parts behind (its deletion
    also takes the parts of a writer that died before its manifest). A bucket whose limit goes down while the
    control plane runs is written in smaller parts."""
    jet = await connect(nats_server.url)
    kv = jet.kv["team_state"]
    repo = LargeRepo(kv, Customer)
    big = Customer(id="c1", name="x" * 10_000)
    async with small_messages(nats_server.url, "KV_caravan_team_state", 4096):
        await repo.put("cu.tk1", big)
        assert await repo.get("cu.tk1") == big

        async def writes() -> set[str]:  # the writes whose parts are stored
            return {e.key.split(".")[3] for e in await kv_entries(kv, "cu.tk1.part.>")}

        first = await writes()
        assert len(first) == 1 and len(await kv_entries(kv, "cu.tk1.part.>")) >= 3  # 10 kB in parts of 3 kB
        bigger = Customer(id="c1", name="y" * 20_000)
        await repo.put("cu.tk1", bigger)  # the parts it replaces go
        assert await repo.get("cu.tk1") == bigger
        assert len(await writes()) == 1 and await writes() != first
        small = Customer(id="c1", name="small")
        await repo.put("cu.tk1", small)
        assert await repo.get("cu.tk1") == small and await kv_entries(kv, "cu.tk1.part.>") == []
        parts = await jet.js.stream_info("KV_caravan_team_state", subjects_filter="$KV.caravan_team_state.cu.tk1.>")
        assert not parts.state.subjects  # nothing left under the parts' subjects: not even a purge marker for each
        await repo.put("cu.tk2", big)
        other = LargeRepo(kv, Customer)  # another process: it reads the parts, and deleting takes them too
        assert await other.get("cu.tk2") == big
        await other.delete("cu.tk2")
        assert await repo.get("cu.tk2") is None and await kv_entries(kv, "cu.tk2.part.>") == []
        await repo.put("cu.tk3", big)
        await LargeRepo(kv, Customer).put("cu.tk3", small)  # a run taken over: the new writer replaces the parts
        assert await repo.get("cu.tk3") == small and await kv_entries(kv, "cu.tk3.part.>") == []
        await repo.put("cu.tk4", big)
        await kv.put("cu.tk4.part.0dead0beef00.0", b"a writer that died before its manifest")
        await kv.put("cu.tk40.part.0dead0beef00.0", b"another key's part")
        await LargeRepo(kv, Customer).delete("cu.tk4")
        assert await repo.get("cu.tk4") is None and await kv_entries(kv, "cu.tk4.part.>") == []
        assert [e.key for e in await kv_entries(kv, "cu.tk40.part.>")] == ["cu.tk40.part.0dead0beef00.0"]
        async with small_messages(nats_server.url, "KV_caravan_team_state", 2048):  # an operator lowers the limit
            await repo.put("cu.tk1", bigger)
            assert await repo.get("cu.tk1") == bigger
            assert len(await writes()) == 1 and len(await kv_entries(kv, "cu.tk1.part.>")) >= 20  # none refused
    await jet.close()


async def test_a_lost_nats_is_logged_a_line_at_a_time_without_tracebacks(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """While NATS is away the control plane tries again every 2 s: each attempt is one line of its own, not
    nats-py's traceback; and its coming back is said."""
    server = EmbeddedNats(tmp_path / "nats")
    await server.start()
    jet = await connect(server.url)
    try:
        with caplog.at_level(logging.WARNING):
            port = server.port
            await server.stop()

            async def said() -> list[str]:
                return [r.getMessage() for r in caplog.records if r.name == "caravan.nats"]

            await assert_eventually(said, lambda lines: any("Connection refused" in line for line in lines))
            assert "NATS: disconnected; reconnecting" in await said()
            assert [r for r in caplog.records if r.exc_info] == []
            server = EmbeddedNats(tmp_path / "nats", port=port)
            await server.start()
            await assert_eventually(said, lambda lines: "NATS: reconnected" in lines)
    finally:
        await jet.nc.close()
        await server.stop()
