"""The audit log's queries against a real JetStream: which records they find, and how much of the log they read."""

from __future__ import annotations

from typing import Any

import pytest
from nats.aio.client import Client as NATS

from control.services.audit import AUDIT_STREAM, QUERY_WINDOW, AuditLog, AuditQuery, AuditRecord

RECORDS = 4 * QUERY_WINDOW


@pytest.fixture
async def audit_log(nc: NATS) -> AuditLog:
    log = AuditLog(nc.jetstream())
    await log.ensure_stream()
    return log


class Delivered:
    """How many messages the connection received from the server since the last :meth:`take` (the records
    JetStream delivered, and a few answers of its API for each consumer: made, fetched from, deleted)."""

    def __init__(self, nc: NATS) -> None:
        self._nc = nc
        self._seen = nc.stats["in_msgs"]

    def take(self) -> int:
        seen, self._seen = self._seen, self._nc.stats["in_msgs"]
        return self._seen - seen


def parsed(monkeypatch: pytest.MonkeyPatch) -> list[AuditRecord]:
    """Every record a query reads from the stream, as it reads it."""
    read: list[AuditRecord] = []
    validate = AuditRecord.model_validate_json

    def reading(data: Any, **kwargs: Any) -> AuditRecord:
        record = validate(data, **kwargs)
        read.append(record)
        return record

    monkeypatch.setattr(AuditRecord, "model_validate_json", reading)
    return read


def login(n: int) -> AuditRecord:
    """The ``n``th record: a login, every 700th one a customer's (cu-000000000007)."""
    return AuditRecord(
        actor="admin:cvn_1a2b3c4d",
        role="admin",
        action="auth.token" if n % 700 else "key.create",
        customer_id=None if n % 700 else "cu-000000000007",
        details={"n": n},
    )


async def test_a_query_reads_the_log_back_from_its_newest_record_as_far_as_its_answer_needs(
    audit_log: AuditLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The log only grows (every login and refused request is a record): a query for the newest records read it
    all from its first, each time, and an operator's `caravan audit` took longer with every day the platform ran."""
    stored = [await audit_log.append(login(n)) for n in range(RECORDS)]
    read = parsed(monkeypatch)

    newest = await audit_log.query(AuditQuery(limit=5))
    assert [r.details["n"] for r in newest] == list(range(RECORDS - 5, RECORDS))
    assert len(read) <= QUERY_WINDOW

    read.clear()
    theirs = await audit_log.query(AuditQuery(customer_id="cu-000000000007", limit=3))  # two windows back
    assert [r.details["n"] for r in theirs] == [2100, 2800, 3500]
    assert len(read) <= 3 * QUERY_WINDOW
    every = await audit_log.query(AuditQuery(action="key.create", limit=1000))
    assert every == [r for r in stored if r.action == "key.create"] and every[-3:] == theirs

    assert await audit_log.query(AuditQuery(limit=1000)) == stored[-1000:]
    since = await audit_log.query(AuditQuery(since=stored[3200].at, limit=1000))
    assert since == [r for r in stored if r.at >= stored[3200].at]
    window = await audit_log.query(AuditQuery(since=stored[10].at, until=stored[20].at, limit=1000))
    assert window == [r for r in stored if stored[10].at <= r.at <= stored[20].at]
    assert await audit_log.query(AuditQuery(since=stored[-1].at.replace(year=2999))) == []


async def test_an_action_that_began_before_until_is_found_though_a_later_record_was_stored_first(
    audit_log: AuditLog,
) -> None:
    """A record is stamped when its action begins and stored when it ends (a killswitch waits for its agents):
    a query up to a time stopped at the first record stamped after it, and missed an action stored behind it."""
    before = await audit_log.append(login(1))
    async with audit_log.recorded(login(2)) as engaging:  # begins, and is stored as it ends
        later = await audit_log.append(login(3))
    assert later.at > engaging.at
    found = await audit_log.query(AuditQuery(until=engaging.at))
    assert [r.details["n"] for r in found] == [before.details["n"], engaging.details["n"]]


API_MSGS = 10
"""More than the answers of JetStream's API a query gets for each stretch of the log it reads."""


async def test_a_query_is_delivered_the_records_it_reads_not_those_stored_after_them(
    audit_log: AuditLog, nc: NATS
) -> None:
    """Each stretch of the log a query read back was read by an ordered push consumer, which JetStream fed up to the
    stream's end until the query let it go: a query answered two stretches back was delivered the newest stretch
    twice, and one with ``since`` the whole log after it, to find where to begin (a 4,000-record log, 4,900 times).
    The action's subject filters on the server: those with another are not delivered at all."""
    stored = [await audit_log.append(login(n)) for n in range(RECORDS)]
    delivered = Delivered(nc)

    theirs = await audit_log.query(AuditQuery(customer_id="cu-000000000007", limit=3))  # two stretches back
    assert [r.details["n"] for r in theirs] == [2100, 2800, 3500]
    assert delivered.take() <= 3 * QUERY_WINDOW + 2 * API_MSGS

    since = await audit_log.query(AuditQuery(since=stored[100].at, limit=10))
    assert since == stored[-10:]
    assert delivered.take() <= 1 + QUERY_WINDOW + 2 * API_MSGS

    created = await audit_log.query(AuditQuery(action="key.create", limit=5))  # its subject's records alone
    assert [r.details["n"] for r in created] == [700, 1400, 2100, 2800, 3500]
    assert delivered.take() <= 6 + 3 * API_MSGS
    assert await nc.jetstream().consumers_info("CARAVAN_AUDIT") == []


async def test_an_old_until_reads_back_from_the_records_stored_soon_after_it_not_from_the_newest(nc: NATS) -> None:
    """A query up to a time long past read back from the newest record, through everything stored since, before it
    found one stamped before that time: an until a year back on a log of a million records read most of it. It
    reads back from the last record stored ``stored_within`` after ``until``, and finds an action stamped before
    ``until`` and stored after records stamped after it, within that time."""
    js = nc.jetstream()
    writer = AuditLog(js)
    await writer.ensure_stream()
    stored = [await writer.append(login(n)) for n in range(100)]
    async with writer.recorded(login(100)) as engaging:  # begins before until, stored after records stamped after it
        stored += [await writer.append(login(n)) for n in range(101, 151)]
    stored.append(engaging)
    stored += [await writer.append(login(n)) for n in range(151, RECORDS)]
    until = stored[120].at  # record 121's stamp
    engaged_at, next_at = [(await js.get_msg(AUDIT_STREAM, seq)).time for seq in (151, 152)]
    assert engaged_at is not None and next_at is not None and until < engaged_at < next_at
    stored_within = engaged_at + (next_at - engaged_at) / 2 - until  # the engagement's record is stored within it
    delivered = Delivered(nc)

    found = await AuditLog(js, stored_within=stored_within).query(AuditQuery(until=until, limit=1000))
    assert [r.details["n"] for r in found] == [*range(100), *range(101, 122), 100]
    assert delivered.take() <= 1 + 151 + 3 * API_MSGS  # where to end, then one stretch: none of the 3,849 after it
