"""The audit log: an append-only JetStream stream (deletes and purges denied by the stream itself).

Every admin and security-relevant action is one record: who, when, what, on what, and the result.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal, Protocol

from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError
from pydantic import AfterValidator, AwareDatetime, BaseModel, BeforeValidator, Field

from agent.protocol import utcnow
from control.errors import CaravanError
from control.ids import is_plain_id, shown_id
from control.natsio import CONSUMER_LIMIT, fetch, pull_reader
from control.services.auth import Principal, redact_json

__all__ = [
    "AUDIT_STREAM",
    "QUERY_WINDOW",
    "AuditLog",
    "AuditQuery",
    "AuditRecord",
    "AuditTime",
    "describe_error",
]

AUDIT_STREAM = "CARAVAN_AUDIT"
log = logging.getLogger("caravan.audit")
_KEPT = {
    "max_msgs": -1,
    "max_bytes": -1,
    "max_age": 0,
    "max_msgs_per_subject": -1,
    "deny_delete": True,
    "deny_purge": True,
}
"""What the audit stream's configuration must say for its records to stay: no limit, no deletes."""
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
QUERY_WINDOW = 1000
"""How many records an audit query reads first, back from the newest (then twice as many each time)."""
QUERY_BATCH = 250
"""How many records an audit query fetches at once, when as many are left of the stretch it reads."""
STORED_WITHIN = timedelta(days=1)
"""How long after ``until`` an audit query looks for a record stamped before it (stored as its action ended)."""
FETCH_TIMEOUT_S = 5.0
"""How long an audit query waits for a batch (of records JetStream holds: it asks for no more)."""


def _in_utc(value: datetime) -> datetime:
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError("must be a time between the years 1 and 9999 in UTC") from None


_NUMBER = re.compile(r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*")


def _no_number(value: Any) -> Any:
    """pydantic reads a number as Unix time, in seconds or milliseconds as its size suggests: a guess too."""
    if isinstance(value, int | float) or (isinstance(value, str) and _NUMBER.fullmatch(value)):
        raise ValueError("must be a time with a timezone (2024-01-01T00:00:00Z), not a number")
    return value


_SPACED_OFFSET = re.compile(r".*\d[T ]\d\d:\d\d(:\d\d(\.\d+)?)? \d\d(:?\d\d)?")


def _no_spaced_offset(value: Any) -> Any:
    """A time whose offset's ``+`` was typed into a URL as it stands, which a query reads as a space."""
    if isinstance(value, str) and _SPACED_OFFSET.fullmatch(value):
        raise ValueError(
            "has a space where its offset's sign goes: in a URL's query a '+' is a space, so send it as %2B "
            "(2024-01-01T00:00:00%2B02:00), or the time in UTC with Z"
        )
    return value


AuditTime = Annotated[
    AwareDatetime, BeforeValidator(_no_number), BeforeValidator(_no_spaced_offset), AfterValidator(_in_utc)
]
"""A bound of an audit query: records are stamped in UTC, so a time without a zone would be a guess."""


DETAIL_MAX = 500
"""A string in a record's details (a path, an error's message, a reason) is kept to this many characters."""
DETAIL_ITEMS_MAX = 50
"""A list in a record's details keeps this many items."""


def bounded(value: Any) -> Any:
    """``value`` (a record's details) with every string cut to :data:`DETAIL_MAX` characters and every list to
    :data:`DETAIL_ITEMS_MAX` items, each cut saying how long it was: a caller who can be refused as often as it
    likes (a 403 on a 60,000-character path) must not be able to write as much as it likes to a log nobody may
    delete."""
    if isinstance(value, str):
        return value if len(value) <= DETAIL_MAX else f"{value[:DETAIL_MAX]}... ({len(value)} characters)"
    if isinstance(value, list):
        kept = [bounded(item) for item in value[:DETAIL_ITEMS_MAX]]
        return kept if len(value) <= DETAIL_ITEMS_MAX else [*kept, f"... ({len(value)} items)"]
    if isinstance(value, dict):
        return {key: bounded(item) for key, item in value.items()}
    return value


class AuditRecord(BaseModel):
    id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    at: datetime = Field(default_factory=utcnow)
    actor: str
    role: str
    action: str
    customer_id: str | None = None
    target: str | None = None
    result: Literal["ok", "denied", "failed"] = "ok"
    details: dict[str, Any] = Field(default_factory=dict)


class AuditQuery(BaseModel):
    actor: str | None = None
    action: str | None = None
    customer_id: str | None = None
    since: AuditTime | None = None
    until: AuditTime | None = None
    limit: int = Field(default=100, ge=1, le=1000)


class Owned(Protocol):
    """A record of one customer's (an agent, a team, a task)."""

    @property
    def customer_id(self) -> str: ...


class AuditLog:
    def __init__(self, js: JetStreamContext, *, stored_within: timedelta = STORED_WITHIN) -> None:
        """``stored_within``: how long after ``until`` a query looks for records stamped before it (see
        :meth:`query`)."""
        self._js = js
        self._stored_within = stored_within

    async def ensure_stream(self) -> None:
        """Create the stream. One that is there already is never changed (on the embedded NATS the platform's user
        may not: a limit set on it would purge it by another name), but a configuration that lets records go is
        logged as an error, naming what differs."""
        config = StreamConfig(
            name=AUDIT_STREAM,
            subjects=["caravan.audit.>"],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            deny_delete=True,
            deny_purge=True,
            max_consumers=CONSUMER_LIMIT,
        )
        try:
            await self._js.add_stream(config)
            return
        except BadRequestError:  # there already, configured otherwise (by hand, or by an older Caravan)
            pass
        current = (await self._js.stream_info(AUDIT_STREAM)).config
        values = {name: getattr(current, name) for name in _KEPT}
        changed = {name: value for name, value in values.items() if value is not None and value != _KEPT[name]}
        if changed:
            log.error(
                "the audit stream %s lets records go (%s): only a NATS administrator can undo it", AUDIT_STREAM, changed
            )

    async def append(self, record: AuditRecord) -> AuditRecord:
        """Append ``record`` (kept for good), with any API key in it cut to its prefix (:func:`redact_json`: a
        target or an error that repeats a path or a value a key was pasted into), its ids as :func:`shown_id` and
        its details :func:`bounded`; returns the record as stored."""
        record = AuditRecord.model_validate(redact_json(record.model_dump(mode="json")))
        if record.customer_id is not None and not is_plain_id(record.customer_id):  # no customer's: as a target
            record.customer_id, record.target = None, record.target or record.customer_id
        record.customer_id, record.target = shown_id(record.customer_id), shown_id(record.target)
        record.actor, record.details = shown_id(record.actor) or "", bounded(record.details)
        subject = f"caravan.audit.{record.action}"
        await self._js.publish(subject, record.model_dump_json().encode(), headers={"Nats-Msg-Id": record.id})
        return record

    @contextlib.asynccontextmanager
    async def recorded(self, record: AuditRecord) -> AsyncIterator[AuditRecord]:
        """Append ``record`` when the block ends: as the block left it if it returns, ``failed`` with the error if it
        raises (the error goes on). The block completes the record (what it created, whom it turned out to concern)."""
        try:
            yield record
        except BaseException as exc:  # cancelled too: what the block did so far (a flag written) is recorded
            record.result = "failed"
            record.details["error"] = (
                describe_error(exc)
                if isinstance(exc, Exception)
                else {"code": "cancelled", "message": "cancelled before it ended (the service stopping?)"}
            )
            await asyncio.shield(self.append(record))
            raise
        await self.append(record)

    @contextlib.asynccontextmanager
    async def admin_action(
        self,
        principal: Principal,
        action: str,
        customer_id: str | None = None,
        target: str | None = None,
        *,
        owner: Callable[[], Awaitable[Owned]] | None = None,
        **details: Any,
    ) -> AsyncIterator[AuditRecord]:
        """:meth:`recorded` for what ``principal`` does, if an admin: a customer's own actions are not audited.
        ``owner`` reads the target first (for an admin only), so that the record names its customer even when the
        action fails (a cancel refused, a scheduler that did not answer); a target that is not there fails it."""
        record = AuditRecord(
            actor=principal.subject,
            role=principal.role.value,
            action=action,
            customer_id=customer_id,
            target=target,
            details=details,
        )
        if not principal.is_admin:
            yield record
            return
        async with self.recorded(record):
            if owner is not None:
                record.customer_id = (await owner()).customer_id
            yield record

    async def query(self, query: AuditQuery) -> list[AuditRecord]:
        """Records matching ``query``, oldest first, at most ``limit`` (the newest ``limit`` of the matches).

        Read back from the newest record, :data:`QUERY_WINDOW` records at first and twice as many each time more
        are needed, down to the first record stored since ``since``: a query costs what it answers, not the whole
        history of a log that only grows (every login is a record, and so is every refused request). JetStream
        delivers the records read (of the query's action alone, if it names one), and none stored after them but
        those stored as it reads: each stretch is fetched by a consumer of its own, no more at a time than are left
        of it, and where it begins is found by another, which is delivered one record.

        A record is stamped as its action begins and stored as it ends (a killswitch waits for its agents' answers,
        a hard one stops their jobs, eight at a time), so that one stamped at or before ``until`` may be stored
        after records stamped after it. It is found if stored within ``stored_within`` (:data:`STORED_WITHIN`, a
        day) of ``until``: an ``until`` further back than that reads back from the last record stored by then, not
        from the newest, and costs a day of the log at most, not the whole history after it. Nothing in Caravan
        bounds how long an action takes (no request has a deadline, a hard killswitch stops as many jobs as it
        covers, a record published while NATS is unreachable is stored once it is back), so one stored more than
        a day after ``until`` is not found by it, though stamped before it: an ``until`` less than a day before it
        was stored finds it."""
        subject = f"caravan.audit.{query.action}" if query.action else "caravan.audit.>"
        state = (await self._js.stream_info(AUDIT_STREAM)).state
        floor = max(state.first_seq, 1)
        if query.since is not None:
            first = await self._first_stored(subject, query.since)
            if first is None:
                return []
            floor = first[0]
        end, beyond, window = state.last_seq, 0, QUERY_WINDOW
        if query.until is not None and query.until < utcnow() - self._stored_within:
            after = await self._first_stored(subject, query.until + self._stored_within)
            if after is not None:
                end, beyond = after[0] - 1, after[1]
        found: list[AuditRecord] = []
        while end >= floor and len(found) < query.limit:
            start = max(floor, end - window + 1)
            matches, read = await self._read(query, subject, start, end, beyond)
            found[:0] = matches
            end, beyond, window = start - 1, beyond + read, window * 2
        return found[-query.limit :]

    async def _first_stored(self, subject: str, at: datetime) -> tuple[int, int] | None:
        """The sequence of the first record of ``subject`` the stream stored at or after ``at``, and how many of
        ``subject``'s it holds from there on (None: none). A record is stamped before it is stored, so none stored
        before ``at`` is stamped after it."""
        if at <= _EPOCH:  # every record is after it; before it, the server's start time (in 64 bits) would wrap
            config = ConsumerConfig(deliver_policy=DeliverPolicy.ALL, filter_subject=subject)
        else:
            config = ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_TIME, opt_start_time=at, filter_subject=subject
            )
        async with pull_reader(self._js, AUDIT_STREAM, config) as (sub, pending):
            if not pending:
                return None
            msg = (await fetch(sub, 1, wait=FETCH_TIMEOUT_S))[0]
            return msg.metadata.sequence.stream, 1 + msg.metadata.num_pending

    async def _read(
        self, query: AuditQuery, subject: str, start: int, end: int, beyond: int
    ) -> tuple[list[AuditRecord], int]:
        """The records of ``subject`` from sequence ``start`` to ``end`` that match ``query``, in the order they
        were stored, and how many of ``subject``'s there were, knowing that the stream holds ``beyond`` of them
        after ``end`` (more if some were stored since the query began: what it may be delivered after ``end``)."""
        config = ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start, filter_subject=subject
        )
        found: list[AuditRecord] = []
        read, last = 0, start - 1
        async with pull_reader(self._js, AUDIT_STREAM, config) as (sub, pending):
            while (left := min(pending - beyond, end - last)) > 0:
                for msg in await fetch(sub, min(QUERY_BATCH, left), wait=FETCH_TIMEOUT_S):
                    last, pending = msg.metadata.sequence.stream, msg.metadata.num_pending
                    if last > end:
                        return found, read
                    read += 1
                    record = AuditRecord.model_validate_json(msg.data)
                    if _matches(record, query):
                        found.append(record)
        return found, read


def describe_error(exc: Exception) -> dict[str, str]:
    """What went wrong, as the API said it; an unexpected error by its kind only (its text may hold internals)."""
    if isinstance(exc, CaravanError):
        return {"code": exc.code, "message": exc.message}
    return {"code": "internal", "message": f"unexpected error ({type(exc).__name__})"}


def _matches(record: AuditRecord, query: AuditQuery) -> bool:
    return (
        (query.actor is None or record.actor == query.actor)
        and (query.customer_id is None or record.customer_id == query.customer_id)
        and (query.since is None or record.at >= query.since)
        and (query.until is None or record.at <= query.until)
    )
