"""A JetStream fetch whose wait runs out between nats-py's two requests (its no-wait look, then the lingering one)
raises a bare ``asyncio.TimeoutError`` (the builtin), not nats-py's own: a caller that took only the latter for
"nothing yet" broke off a task's stream of events, and an audit query answered a 500, where NATS being slow is a
503."""

from __future__ import annotations

from typing import Any

import nats
import nats.errors
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import StreamConfig

from control.natsio import NATS_UNAVAILABLE, PacedReader
from control.services.audit import AuditLog, AuditQuery, AuditRecord


@pytest.fixture
def runs_late(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The next fetch raises what nats-py raises when its wait runs out between its requests; the list counts
    the fetches that did."""
    late: list[int] = []
    fetch = JetStreamContext.PullSubscription.fetch

    async def late_once(self: JetStreamContext.PullSubscription, *args: Any, **kwargs: Any) -> Any:
        if not late:
            late.append(1)
            raise TimeoutError  # (asyncio.TimeoutError is this builtin)
        return await fetch(self, *args, **kwargs)

    monkeypatch.setattr(JetStreamContext.PullSubscription, "fetch", late_once)
    return late


async def test_a_paced_reader_whose_fetch_runs_late_has_nothing_yet_and_reads_on(
    nc: NATS, runs_late: list[int]
) -> None:
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name="LATE", subjects=["late.>"]))
    async with PacedReader(js, "LATE", "late.one") as reader:
        with pytest.raises(nats.errors.TimeoutError):  # what a stream of events takes for a keep-alive
            await reader.next(idle=0.5)
        assert runs_late == [1]
        await js.publish("late.one", b"first")
        assert (await reader.next(idle=5)).data == b"first"


async def test_an_audit_query_whose_fetch_runs_late_is_nats_unavailable(nc: NATS, runs_late: list[int]) -> None:
    audit = AuditLog(nc.jetstream())
    await audit.ensure_stream()
    await audit.append(AuditRecord(actor="admin:cvn_1a2b3c4d", role="admin", action="auth.token"))
    with pytest.raises(NATS_UNAVAILABLE):  # a 503 (gateway/errors.py), not a 500
        await audit.query(AuditQuery())
    assert runs_late == [1]
    assert [r.action for r in await audit.query(AuditQuery())] == ["auth.token"]
