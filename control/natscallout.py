"""Agents' own NATS users on a NATS of the operator's own, by NATS's auth callout (nats-server 2.11 or later).

The server sends every login but its ``auth_users`` (the platform's own user) to ``$SYS.REQ.USER.AUTH`` as an
authorization request (a JWT the server signs), and lets the client in as the user JWT the answer carries, or
refuses it. The control plane answers (one queue group: each request is answered by one replica): an agent's user
(``agent-<agent id>``) whose password is the one derived for it and whose agent is in the store gets exactly the
permissions the embedded default gives it (:func:`control.natsauth.agent_permissions`), the watching user its
own; anything else is refused. Both JWTs are signed with the issuer account's nkey seed
(``CARAVAN_NATS_CALLOUT_SEED``), whose public key the server's ``auth_callout { issuer }`` names, and the
passwords are derived from that seed too: one secret.

Logins are answered concurrently (up to ``IN_FLIGHT`` at once), each reading its agent's record in the store when it
is made: a NATS restart sends every agent's logins at once, and the server refuses one not answered within its
authorization timeout (2 s). The record is read by its key, its customer known from the agents this control plane
has seen (:class:`CalloutLogins`); an agent it has not seen yet is found by its id among all customers'.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import re
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import nats.errors
import nkeys
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from control.natsauth import (
    WATCH_USER,
    DerivedLogins,
    agent_permissions,
    derived_password,
    watch_permissions,
)

__all__ = [
    "CALLOUT_SUBJECT",
    "CalloutLogins",
    "NatsCallout",
    "issuer_public_key",
    "jwt_permissions",
    "new_issuer_seed",
]

log = logging.getLogger("caravan.nats")

CALLOUT_SUBJECT = "$SYS.REQ.USER.AUTH"
_QUEUE = "caravan-control"
_PLACEMENT = "$G"
"""The account a user is placed in: without operator mode, the global account, where the platform's user is."""
_AGENT_USER = re.compile(r"^agent-(.+)$")
_LIMITS = {"subs": -1, "data": -1, "payload": -1}  # no limits beyond the server's own, as a configured user has
_DECODE_ERRORS = (ValueError, RecursionError, nkeys.NkeysError)

IN_FLIGHT = 64
"""Authorization requests a control plane answers at once; the next wait in the subscription's queue."""
ANSWER_WITHIN_S = 1.8
"""How long a login's check may take, from the request's coming (its wait for a place included): NATS refuses a
login not answered within its authorization timeout (2 s), so a check that takes longer (the store slow to answer)
is given up, and its place goes to a login NATS still waits on."""

FindAgent = Callable[[str, str | None], Awaitable[str | None]]
"""The customer id of an agent that exists (by its id, and its customer's id if known: its record is then read by its
key), None for one that does not (never was, or deleted)."""


def new_issuer_seed() -> str:
    """A new account nkey seed (``SA...``): what ``CARAVAN_NATS_CALLOUT_SEED`` holds."""
    return nkeys.encode_seed(secrets.token_bytes(32), nkeys.PREFIX_BYTE_ACCOUNT).decode()


def _issuer(seed: str) -> nkeys.KeyPair:
    try:
        prefix, _ = nkeys.decode_seed(seed.strip().encode())
    except _DECODE_ERRORS:
        raise ValueError("not an nkey seed (caravan nats-callout-keys makes one)") from None
    if prefix != nkeys.PREFIX_BYTE_ACCOUNT:
        raise ValueError("not an account nkey seed (SA...): the auth callout's issuer is an account")
    return nkeys.from_seed(seed.strip().encode())


def issuer_public_key(seed: str) -> str:
    """The account public key (``A...``) of ``seed``: what the server's ``auth_callout { issuer }`` names.
    :class:`ValueError` for anything but an account seed."""
    return str(_issuer(seed).public_key.decode())


def _login_key(seed: str) -> bytes:
    return hmac.new(seed.strip().encode(), b"caravan nats logins", hashlib.sha256).digest()


class CalloutLogins(DerivedLogins):
    """The agents' and the watching user's logins, derived from the issuer seed: the same seed on every replica
    gives the same passwords, and none is stored. The server keeps no list of users: the callout asks the store
    at each login. What is kept here is where to look: the customer of each agent this control plane has seen (an
    agent's customer never changes), which says nothing of whether the agent is still there."""

    def __init__(self, seed: str) -> None:
        super().__init__(_login_key(seed))
        self._customers: dict[str, str] = {}  # agent id -> customer id

    def set_agents(self, agents: dict[str, str]) -> None:
        self._customers.update(agents)  # (an agent added meanwhile is kept: the list was read before it)

    def add_agent(self, customer_id: str, agent_id: str) -> None:
        self._customers[agent_id] = customer_id

    def remove_agent(self, agent_id: str) -> None:
        self._customers.pop(agent_id, None)

    def customer_of(self, agent_id: str) -> str | None:
        """The customer of an agent seen here, None for one not seen (or seen gone)."""
        return self._customers.get(agent_id)

    def password_matches(self, user: str, password: str) -> bool:
        return hmac.compare_digest(derived_password(self._key, user).encode(), password.encode())


def jwt_permissions(permissions: Mapping[str, Any]) -> dict[str, Any]:
    """NATS configuration's permissions (``publish``/``subscribe``, each ``allow``/``deny``) as a user JWT's
    (``pub``/``sub``). Anything else (``allow_responses``, which agents must not have: see natsauth) is refused
    rather than dropped, so that the two ways to run cannot grant different rights unseen."""
    names = {"publish": "pub", "subscribe": "sub"}
    unknown = set(permissions) - set(names)
    if unknown:
        raise ValueError(f"no JWT translation for the permissions {sorted(unknown)}")
    translated: dict[str, Any] = {}
    for name, rules in permissions.items():
        if set(rules) - {"allow", "deny"}:
            raise ValueError(f"no JWT translation for {name} {sorted(set(rules) - {'allow', 'deny'})}")
        translated[names[name]] = {kind: list(subjects) for kind, subjects in rules.items()}
    return translated


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


_HEADER = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}, separators=(",", ":")).encode())


def encode_jwt(claims: Mapping[str, Any], issuer: nkeys.KeyPair) -> str:
    """``claims`` as a NATS JWT (v2) signed by ``issuer``: ``iss``, ``iat`` and ``jti`` filled in."""
    body = {**claims, "iss": issuer.public_key.decode(), "iat": int(time.time())}
    body["jti"] = base64.b32encode(hashlib.sha256(json.dumps(body, sort_keys=True).encode()).digest()).decode()
    payload = _b64(json.dumps(body, separators=(",", ":")).encode())
    signed = f"{_HEADER}.{payload}"
    return f"{signed}.{_b64(issuer.sign(signed.encode()))}"


@dataclass(frozen=True)
class _Request:
    server_id: str
    user_nkey: str
    user: str
    password: str


def _field(claims: object, *path: str) -> Any:
    for name in path:
        if not isinstance(claims, dict) or name not in claims:
            raise ValueError(f"no {'.'.join(path)}")
        claims = claims[name]
    return claims


def _text(claims: object, *path: str, default: str | None = None) -> str:
    try:
        value = _field(claims, *path)
    except ValueError:
        if default is None:
            raise
        return default
    if not isinstance(value, str):
        raise ValueError(f"{'.'.join(path)} is no string")
    return value


def _decode_request(data: bytes) -> _Request:
    """The parts of an authorization request the answer needs. :class:`ValueError` (or another of
    ``_DECODE_ERRORS``) for anything else: an encrypted one (no ``xkey`` is configured), a JWT that is not one."""
    parts = data.decode().split(".")
    if len(parts) != 3:
        raise ValueError("not a JWT")
    claims = json.loads(_unb64(parts[1]))
    if _text(claims, "nats", "type") != "authorization_request":
        raise ValueError("not an authorization request")
    request = _Request(
        server_id=_text(claims, "nats", "server_id", "id"),
        user_nkey=_text(claims, "nats", "user_nkey"),
        user=_text(claims, "nats", "connect_opts", "user", default=""),
        password=_text(claims, "nats", "connect_opts", "pass", default=""),
    )
    if not request.server_id or not request.user_nkey:
        raise ValueError("no server id or user nkey")
    return request


class NatsCallout:
    """Answers the server's authorization requests while started, ``in_flight`` at once. ``answered`` counts the
    answers by outcome (``allowed``, ``refused``, ``malformed``)."""

    def __init__(
        self,
        nc: NATS,
        seed: str,
        find_agent: FindAgent,
        in_flight: int = IN_FLIGHT,
        answer_within_s: float = ANSWER_WITHIN_S,
    ) -> None:
        self._nc = nc
        self._answer_within_s = answer_within_s
        self._issuer = _issuer(seed)
        self._logins = CalloutLogins(seed)
        self._find_agent = find_agent
        self._sub: Subscription | None = None
        self._slots = asyncio.Semaphore(in_flight)
        self._answering: set[asyncio.Task[None]] = set()
        self.answered: Counter[str] = Counter()

    @property
    def logins(self) -> CalloutLogins:
        return self._logins

    async def start(self) -> None:
        if self._sub is not None:
            raise RuntimeError("NATS auth callout already started")
        self._sub = await self._nc.subscribe(CALLOUT_SUBJECT, queue=_QUEUE, cb=self._serve)

    async def stop(self) -> None:
        """Answers the requests already received (no client is left waiting for the server's auth timeout), then
        takes no more."""
        sub, self._sub = self._sub, None
        if sub is not None and not self._nc.is_closed:
            try:
                await sub.drain()
            except nats.errors.Error as exc:  # NATS away: no request can come meanwhile, nor an answer go
                log.warning("NATS auth callout: stopped without answering what it had received (%s)", exc)
        await asyncio.gather(*self._answering)  # (each ends within ANSWER_WITHIN_S)

    async def _serve(self, msg: Msg) -> None:
        if not msg.reply:  # (only the server publishes here: NATS refuses any client's publish to the subject)
            return
        deadline = asyncio.get_running_loop().time() + self._answer_within_s  # (counted from its coming)
        await self._slots.acquire()  # all taken: the requests after this one wait in the subscription's queue
        task = asyncio.create_task(self._reply(msg.reply, msg.data, deadline), name="nats-callout-answer")
        self._answering.add(task)
        task.add_done_callback(self._answering.discard)

    async def _reply(self, reply: str, request: bytes, deadline: float) -> None:
        try:
            await self._nc.publish(reply, await self.answer(request, deadline))
        except nats.errors.Error as exc:  # the connection closed: the server refuses the login when its wait ends
            log.warning("NATS auth callout: an answer could not be sent (%s)", exc)
        finally:
            self._slots.release()

    async def answer(self, request: bytes, deadline: float | None = None) -> bytes:
        """The answer to one authorization request: a signed authorization response, letting the login in or
        refusing it, or nothing (the server then refuses it, "no reason supplied") for a request it cannot read.
        A login not checked by ``deadline`` (the event loop's time; default: ``answer_within_s`` from now) is
        refused. Never raises."""
        try:
            decoded = _decode_request(request)
        except _DECODE_ERRORS as exc:
            log.warning("NATS auth callout: a malformed authorization request, refused (%s)", type(exc).__name__)
            self.answered["malformed"] += 1
            return b""
        if deadline is None:
            deadline = asyncio.get_running_loop().time() + self._answer_within_s
        try:
            async with asyncio.timeout_at(deadline):
                user = await self._authorize(decoded)
        except Exception as exc:  # refused, and the client tries again
            if isinstance(exc, TimeoutError):  # the server gives up waiting: the slot goes to one it waits on
                log.warning("NATS auth callout: %r not checked in time; refused", decoded.user[:80])
            else:  # the store unreachable, say
                log.exception("NATS auth callout: could not decide on %r; refused", decoded.user[:80])
            user, error = None, "Caravan could not check this login now"
        else:
            error = "" if user is not None else "unknown user or wrong password"
        if user is not None:
            answer = {"jwt": user}
            self.answered["allowed"] += 1
        else:
            log.info("NATS auth callout: login of %r refused: %s", decoded.user[:80], error)
            answer = {"error": error}
            self.answered["refused"] += 1
        claims = {
            "sub": decoded.user_nkey,
            "aud": decoded.server_id,
            "nats": {**answer, "type": "authorization_response", "version": 2},
        }
        return encode_jwt(claims, self._issuer).encode()

    async def _authorize(self, request: _Request) -> str | None:
        """The user JWT for a login the callout lets in, None for one it refuses."""
        if not self._logins.password_matches(request.user, request.password):
            return None
        if request.user == WATCH_USER:
            permissions = watch_permissions()
        else:
            match = _AGENT_USER.match(request.user)
            if match is None:
                return None
            agent_id = match.group(1)
            customer_id = await self._find_agent(agent_id, self._logins.customer_of(agent_id))
            if customer_id is None:
                self._logins.remove_agent(agent_id)  # (deleted through another replica)
                return None
            self._logins.add_agent(customer_id, agent_id)
            permissions = agent_permissions(customer_id, agent_id)
        claims = {
            "sub": request.user_nkey,
            "aud": _PLACEMENT,
            "name": request.user,
            "nats": {**jwt_permissions(permissions), **_LIMITS, "type": "user", "version": 2},
        }
        return encode_jwt(claims, self._issuer)
