"""Dependencies: the control plane, the caller (from the bearer JWT) and their scope."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from typing import Annotated, Any

from fastapi import Depends, Query, Request
from fastapi.dependencies.models import Dependant
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.requests import HTTPConnection

from agent.logsafe import printable
from control.errors import Forbidden, Invalid, Unauthorized, invalid_input
from control.ids import is_plain_id
from control.platform import ControlPlane
from control.services.audit import AuditRecord
from control.services.auth import Principal
from gateway.errors import shown_path
from gateway.ratelimit import FAILED_AUTH, RateLimited, RateLimiter, Tiers
from gateway.streams import OpenStreams

__all__ = [
    "HEAD_SCOPE_KEY",
    "AdminDep",
    "ControlDep",
    "ListedQuery",
    "OwnerQuery",
    "PrincipalDep",
    "StreamsDep",
    "answering_head",
    "authenticate_first",
    "check_failures",
    "customer_only",
    "known_query_only",
    "listed_scope",
    "owner_scope",
    "refused_query",
    "target_customer",
]

_bearer = HTTPBearer(auto_error=False, description="JWT from POST /v1/auth/token")


HEAD_SCOPE_KEY = "caravan.head"
"""Set in the scope of a GET that answers a HEAD (gateway.app's ``_HeadAsGet``): only its headers will go out."""


def answering_head(request: HTTPConnection) -> bool:
    """Whether this GET answers a HEAD: a route whose body costs something to open (a task's event stream) can
    skip it, since the response ends with its headers."""
    return bool(request.scope.get(HEAD_SCOPE_KEY))


def get_control(request: HTTPConnection) -> ControlPlane:
    control: ControlPlane = request.app.state.control
    return control


ControlDep = Annotated[ControlPlane, Depends(get_control)]


def get_streams(connection: HTTPConnection) -> OpenStreams:
    streams: OpenStreams = connection.app.state.streams
    return streams


StreamsDep = Annotated[OpenStreams, Depends(get_streams)]


async def get_principal(
    request: HTTPConnection,
    control: ControlDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """The caller, from the bearer JWT; failures are audited, and every caller is held to its tier's rate."""
    limiter: RateLimiter = request.app.state.limiter
    check_failures(request, take=False)
    try:
        if len(request.headers.getlist("authorization")) > 1:  # (the bearer read is the first's)
            raise Unauthorized("send one Authorization header: this request has several, and which is meant is unknown")
        if credentials is None or credentials.scheme.lower() != "bearer":
            how = "as Authorization: Bearer or ?token=" if request.scope["type"] == "websocket" else "as the bearer"
            raise Unauthorized(f"missing token: send the access_token of POST /v1/auth/token {how}")
        principal = await control.auth.verify(credentials.credentials)
    except Unauthorized as exc:
        check_failures(request)
        await audit_denied(control, request, "auth.denied", "anonymous", exc.message)
        raise
    tier = principal.tier
    if principal.customer_id is not None:  # the tier now, not the one the token was issued with
        tiers: Tiers = request.app.state.tiers
        tier = await tiers.of(principal.customer_id, control.quotas.tier)
    limiter.check(principal.key_prefix or principal.subject, tier)
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]


async def get_admin(request: HTTPConnection, control: ControlDep, principal: PrincipalDep) -> Principal:
    if not principal.is_admin:
        check_failures(request)  # counted as a failed authentication: nobody may write the audit log at will
        await audit_denied(
            control, request, "auth.forbidden", principal.subject, "admin role required", principal.role.value
        )
        raise Forbidden("admin role required")
    return principal


async def authenticate_first(request: Request) -> None:
    """Ask who the caller is, as the route ``request`` was matched to asks, for a request refused before its
    dependencies ran: FastAPI reads a JSON body first, so that one which is no JSON would be answered 422 to a
    caller not yet known (and uncounted by the rate limits). Raises what the route's own dependencies would: 401,
    403, 429. A route that asks nobody (the token exchange) passes."""
    calls = _calls(request)
    if get_principal not in calls:
        return
    control = get_control(request)
    principal = await get_principal(request, control, await _bearer(request))
    if get_admin in calls:
        await get_admin(request, control, principal)


def _route_dependants(connection: HTTPConnection) -> Iterator[Dependant]:
    """The route ``connection`` was matched to and every dependency it runs, at any depth."""
    pending = [getattr(connection.scope.get("route"), "dependant", None)]
    while pending:
        if (dependant := pending.pop()) is not None:
            yield dependant
            pending.extend(dependant.dependencies)


def _calls(connection: HTTPConnection) -> set[Callable[..., Any]]:
    """Every dependency the route of ``connection`` runs, at any depth."""
    return {d.call for d in _route_dependants(connection) if d.call is not None}


def _query_names(connection: HTTPConnection) -> set[str]:
    """The query parameters the route of ``connection`` takes, by the names clients send."""
    return {param.alias for d in _route_dependants(connection) for param in d.query_params}


def refused_query(connection: HTTPConnection) -> Invalid | None:
    """The ``422`` for the query parameters of ``connection`` that its route does not take, naming them and those
    the route takes, and for those it takes once given more than once; None if it takes them all. A typo was
    ignored: ``?customer=`` for ``?customer_id=`` gave an admin every customer's tasks, and ``?afer=`` a WebSocket
    the whole stream again; of ``?status=running&status=failed`` the last counted, and only failed tasks came."""
    known = _query_names(connection)
    given = Counter(name for name, _ in connection.query_params.multi_items())
    unknown = sorted(name for name in given if name not in known)
    repeated = sorted(name for name, times in given.items() if times > 1 and name in known)
    if not unknown and not repeated:
        return None
    takes = f"this route takes {', '.join(sorted(known))}" if known else "this route takes none"
    errors = [
        {"loc": (printable(name)[:100],), "msg": f"unknown query parameter ({takes})", "type": "unknown_parameter"}
        for name in unknown[:20]
    ]
    errors += [
        {"loc": (name,), "msg": f"given {given[name]} times: give it once", "type": "repeated_parameter"}
        for name in repeated
    ]
    return invalid_input(errors)


async def known_query_only(request: HTTPConnection) -> None:
    """A router's dependency: :func:`refused_query` refused once the caller is known (401, 403, 429 first). A
    WebSocket's route asks it itself, after the token it may take in its query."""
    if isinstance(request, Request) and (refused := refused_query(request)) is not None:
        await authenticate_first(request)
        raise refused


def check_failures(request: HTTPConnection, take: bool = True) -> None:
    """Count a failed authentication against the client's address (``take``), or refuse the client with 429 if
    it has failed too often (see ``FAILED_AUTH``)."""
    limiter: RateLimiter = request.app.state.limiter
    client = request.client.host if request.client else "unknown"
    try:
        limiter.check(f"client:{client}", FAILED_AUTH, take=take)
    except RateLimited as exc:
        raise RateLimited("too many failed authentications from this address; retry later", exc.retry_after) from None


async def audit_denied(
    control: ControlPlane, request: HTTPConnection, action: str, actor: str, why: str, role: str = "unknown"
) -> None:
    """A refused request in the audit log: ``role`` is the caller's when it authenticated (a customer refused an
    admin route)."""
    client = request.client.host if request.client else None
    details = {"path": shown_path(request.url.path), "why": why, "client": client}
    await control.audit.append(AuditRecord(actor=actor, role=role, action=action, result="denied", details=details))


AdminDep = Annotated[Principal, Depends(get_admin)]


def owner_scope(principal: Principal) -> str | None:
    """The customer whose records the caller may see; None means every customer (admins)."""
    return None if principal.is_admin else principal.customer_id


OwnerQuery = Annotated[str | None, Query(max_length=64, description="Admins only: the owner.")]
"""``?customer_id=`` of a create: the customer an admin makes the record for (:func:`target_customer`)."""
ListedQuery = Annotated[str | None, Query(max_length=64, description="Admins: one customer's only.")]
"""``?customer_id=`` of a listing: the one customer an admin lists (:func:`listed_scope`)."""


def _own_or_refused(principal: Principal, customer_id: str | None) -> str:
    """A customer's own id; ``?customer_id=`` naming another customer is refused (it used to be ignored, which
    let a script believe it acted for someone else)."""
    assert principal.customer_id is not None
    if customer_id is not None and customer_id != principal.customer_id:
        raise Forbidden("?customer_id= names another customer: only admins act for other customers")
    return principal.customer_id


def customer_only(principal: Principal, instead: str) -> str:
    """The caller's own customer id, for what only a customer does (start a task, read its usage): an admin has
    none, and is refused ``403``, told what to do ``instead``."""
    if principal.is_admin or principal.customer_id is None:
        raise Forbidden(f"customers only: {instead}")
    return principal.customer_id


def _named(customer_id: str) -> str:
    if not is_plain_id(customer_id):  # a pattern (`*`, `>`) would match every customer's records
        raise Invalid("?customer_id= must be a customer id")
    return customer_id


def target_customer(principal: Principal, customer_id: str | None) -> str:
    """The customer a new record belongs to: the caller's own, or the one an admin names."""
    if not principal.is_admin:
        return _own_or_refused(principal, customer_id)
    if not customer_id:
        raise Invalid("admins act for a customer: give ?customer_id=")
    return _named(customer_id)


def listed_scope(principal: Principal, customer_id: str | None) -> str | None:
    """The customer whose records a listing shows: the caller's own; for an admin, the one ``?customer_id=`` names,
    or every customer (None)."""
    if not principal.is_admin:
        return _own_or_refused(principal, customer_id)
    return None if customer_id is None else _named(customer_id)
