"""Audit queries on a log of 20,000 records (every login is a record: the log only grows): the newest 100, a window
of 100 in the middle (``since``/``until``) and an ``until`` long past, each beside reading the whole log once (what
a query cost that was fed the log to its end), measured in the same run: the median time of ``ROUNDS`` queries,
and the messages the connection received for one. Run by ./dev/bench; prints its figures."""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta

from nats.aio.client import Client as NATS

from control.services.audit import AUDIT_STREAM, AuditLog, AuditQuery, AuditRecord

RECORDS = 20_000
EARLY = 2_000  # stored before the pause; the old `until` is the last of them
STORED_WITHIN = timedelta(seconds=1)  # stands in for a day (STORED_WITHIN), so the early records are "long past"
ROUNDS = int(os.environ.get("BENCH_AUDIT_ROUNDS", "7"))


def login(n: int) -> AuditRecord:
    return AuditRecord(actor="admin:cvn_1a2b3c4d", role="admin", action="auth.token", details={"n": n})


async def test_audit_queries_cost_what_they_answer(nc: NATS) -> None:
    js = nc.jetstream()
    audit = AuditLog(js, stored_within=STORED_WITHIN)
    await audit.ensure_stream()

    async def store(numbers: range) -> list[AuditRecord]:
        stored: list[AuditRecord] = []
        for start in range(numbers.start, numbers.stop, 500):
            batch = range(start, min(start + 500, numbers.stop))
            stored += await asyncio.gather(*(audit.append(login(n)) for n in batch))
        return stored

    stored = await store(range(EARLY))
    await asyncio.sleep(2 * STORED_WITHIN.total_seconds())
    stored += await store(range(EARLY, RECORDS))
    middle = sorted(stored, key=lambda r: r.details["n"])[RECORDS // 2 : RECORDS // 2 + 100]

    async def whole_log() -> int:
        sub = await js.subscribe("caravan.audit.>", ordered_consumer=True, stream=AUDIT_STREAM)
        try:
            for _ in range(RECORDS):
                await sub.next_msg(timeout=10)
        finally:
            await sub.unsubscribe()
        return RECORDS

    async def query(q: AuditQuery) -> Callable[[], Awaitable[int]]:
        async def run() -> int:
            return len(await audit.query(q))

        return run

    cases = {
        "whole log read once (baseline)": whole_log,
        "newest 100": await query(AuditQuery(limit=100)),
        "100 in the middle (since/until)": await query(AuditQuery(since=middle[0].at, until=middle[-1].at)),
        f"until long past (record {EARLY})": await query(AuditQuery(until=stored[EARLY - 1].at, limit=100)),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    delivered: dict[str, int] = {}
    answered: dict[str, int] = {}
    for _ in range(ROUNDS):
        for name, case in cases.items():
            before = nc.stats["in_msgs"]
            started = time.perf_counter()
            answered[name] = await case()
            times[name].append(time.perf_counter() - started)
            delivered[name] = nc.stats["in_msgs"] - before
    assert answered["newest 100"] == 100 and answered["100 in the middle (since/until)"] >= 100
    baseline = statistics.median(times["whole log read once (baseline)"])
    print()
    print(f"audit queries on {RECORDS:,} records, median of {ROUNDS} interleaved rounds")
    for name, values in times.items():
        median = statistics.median(values)
        print(
            f"  {name:34s} {median * 1000:7.1f} ms  {median / baseline:5.2f}x the whole log  "
            f"{answered[name]:6,} answered  {delivered[name]:6,} messages received"
        )
