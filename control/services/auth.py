"""Customers, API keys and short-lived JWTs.

An API key is shown once: only its SHA-256 is stored (keys are 256-bit random, so a fast hash is the
right tool), keyed by that hash, with a visible prefix that identifies it in lists and logs. A generated key
starts with its prefix (``cvn_`` and 8 random hex digits, apart from the secret part); a key chosen outside
(``CARAVAN_ADMIN_KEY``) gets a random prefix of the same shape, kept with it, so that no part of it is shown.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import jwt
from nats.js.errors import KeyWrongLastSequenceError
from nats.js.kv import KeyValue
from pydantic import BaseModel, Field

from agent.protocol import utcnow
from control.errors import Conflict, NotFound, Unauthorized
from control.ids import is_plain_id, new_id, quoted_id
from control.models import ApiKey, Customer, Role
from control.store import AlreadyExists, Repo

__all__ = [
    "AuthService",
    "IssuedKey",
    "LastAdminKey",
    "Principal",
    "actor_named",
    "admin_subject",
    "redact_json",
    "redact_keys",
    "shown_prefix",
]

_KEY_PREFIX = "cvn"
_PREFIX_LENGTH = 12  # cvn_ and 8 hex digits; every key is longer
_PREFIX_PATTERN = r"cvn_[0-9a-f]{8}"  # a generated key's prefix; its secret follows after "_"
_GENERATED_KEY = re.compile(_PREFIX_PATTERN + "_")
_GENERATED_KEY_IN_TEXT = re.compile(f"({_PREFIX_PATTERN})_[A-Za-z0-9_-]+")  # the secret: token_urlsafe's alphabet
_KEY_PREFIX_ONLY = re.compile(_PREFIX_PATTERN)
_REVOCATION_REFRESH_S = 2.0
_ADMIN_REVOCATIONS = "admin_key_revocations"


def admin_subject(prefix: str) -> str:
    """Who an admin is, in its tokens and the audit log: ``admin:`` and its key's prefix."""
    return f"admin:{prefix}"


def actor_named(text: str) -> str:
    """An audit actor as an operator may name it: an admin by its key's prefix alone is :func:`admin_subject`."""
    return admin_subject(text) if _KEY_PREFIX_ONLY.fullmatch(text) else text


class LastAdminKey(Conflict):
    """Revoking the key would leave no active admin key (and no API makes one)."""

    code = "last_admin_key"


class _AdminRevocations(BaseModel):
    """The hashes of the admin keys revoked, one record changed by compare-and-set: of two revocations that
    would each leave the other's key as the last admin key, one sees the other's here and is refused."""

    hashes: list[str] = Field(default_factory=list)


@dataclass(frozen=True)
class Principal:
    role: Role
    customer_id: str | None
    subject: str
    key_prefix: str = ""
    tier: str = "standard"

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN


@dataclass(frozen=True)
class IssuedKey:
    api_key: str
    prefix: str


def shown_prefix(value: str) -> str:
    """What may be recorded or answered of a value given as a key's prefix, which may be a whole key given in its
    place: the value if it is no longer than a prefix, else the prefix a generated key starts with, else nothing
    of it (a key chosen outside has a random prefix, so no part of it is shown)."""
    if len(value) <= _PREFIX_LENGTH:
        return value
    if _GENERATED_KEY.match(value):
        return f"{value[:_PREFIX_LENGTH]}_<redacted>"
    return "<redacted>"


def redact_keys(text: str) -> str:
    """``text`` (a request's path or query, an answer, a record) with each generated key in it, wherever it is, cut
    to what :func:`shown_prefix` shows of it: its prefix and ``_<redacted>``. A key chosen outside has no shape to
    be found by (only where a prefix belongs, :func:`shown_prefix` hides it)."""
    return _GENERATED_KEY_IN_TEXT.sub(r"\1_<redacted>", text)


def redact_json(value: Any) -> Any:
    """``value`` (JSON: an error body, an audit record) with any generated key in its texts, names included, cut to
    its prefix (:func:`redact_keys`)."""
    if isinstance(value, str):
        return redact_keys(value)
    if isinstance(value, dict):
        return {redact_json(k): redact_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_json(v) for v in value]
    return value


def _hash(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


def _with_prefix(key: ApiKey, old: str, new: str) -> ApiKey | None:
    return key.model_copy(update={"prefix": new}) if key.prefix == old else None


class AuthService:
    def __init__(self, keys: Repo[ApiKey], customers: Repo[Customer], system: KeyValue, ttl_seconds: int) -> None:
        self._keys = keys
        self._customers = customers
        self._system = system
        self._admin_revocations = Repo(system, _AdminRevocations)
        self._ttl = ttl_seconds
        self._secret = ""
        self._revoked: frozenset[str] = frozenset()
        self._revoked_at = float("-inf")

    async def load_secret(self, configured: str | None) -> None:
        """Use the configured JWT secret, or the one generated on first start (shared by all replicas)."""
        if configured:
            self._secret = configured
            return
        with contextlib.suppress(KeyWrongLastSequenceError):  # another replica or an earlier start made it
            await self._system.create("jwt_secret", secrets.token_urlsafe(48).encode())
        entry = await self._system.get("jwt_secret")
        assert entry.value is not None
        self._secret = entry.value.decode()

    def derived_key(self, purpose: str) -> bytes:
        """A key of 32 bytes for ``purpose``, derived from the secret (HMAC-SHA256 over the purpose's name): the
        same on every replica, and no other purpose's nor the tokens' own."""
        if not self._secret:
            raise RuntimeError("the secret is not loaded")
        return hmac.new(self._secret.encode(), f"caravan {purpose}".encode(), hashlib.sha256).digest()

    async def issue_key(self, role: Role, customer_id: str | None, api_key: str | None = None) -> IssuedKey:
        """A new key, or (``api_key``, a key chosen outside) that key, stored once: issued again it keeps its
        prefix."""
        prefix = f"{_KEY_PREFIX}_{secrets.token_hex(4)}"
        key = api_key or f"{prefix}_{secrets.token_urlsafe(32)}"
        record = ApiKey(prefix=prefix, hash=_hash(key), role=role, customer_id=customer_id)
        try:
            await self._keys.create(record.hash, record)
        except AlreadyExists:
            existing = await self._keys.get(record.hash)
            if existing is None or existing.role != role or existing.customer_id != customer_id:
                raise
            if existing.prefix == key[:12]:  # stored when a chosen key's prefix was its own first characters
                existing = await self._keys.update(record.hash, lambda k: _with_prefix(k, key[:12], prefix))
                assert existing is not None
            prefix = existing.prefix
        return IssuedKey(api_key=key, prefix=prefix)

    async def has_admin(self) -> bool:
        return any(k.role is Role.ADMIN and k.revoked_at is None for k in await self._keys.list())

    async def create_customer(self, name: str) -> tuple[Customer, IssuedKey]:
        customer = Customer(id=new_id("cu"), name=name)
        await self._customers.create(customer.id, customer)
        return customer, await self.issue_key(Role.CUSTOMER, customer.id)

    async def get_customer(self, customer_id: str) -> Customer:
        customer = await self._customers.get(customer_id) if is_plain_id(customer_id) else None
        if customer is None:
            raise NotFound(f"customer {quoted_id(customer_id)} not found")
        return customer

    async def list_customers(self) -> list[Customer]:
        return sorted(await self._customers.list(), key=lambda c: c.created_at)

    async def _valid_key(self, api_key: str) -> ApiKey | None:
        """The record of ``api_key`` if it logs in: known, not revoked, and its customer (if any) still there."""
        record = await self._keys.get(_hash(api_key)) if 16 <= len(api_key) <= 256 else None
        if record is None or record.revoked_at is not None:
            return None
        if record.customer_id is not None and await self._customers.get(record.customer_id) is None:
            return None
        return record

    async def logs_in(self, api_key: str) -> bool:
        return await self._valid_key(api_key) is not None

    async def token_for_key(self, api_key: str, tier: Callable[[str], Awaitable[str]]) -> tuple[str, int, Principal]:
        record = await self._valid_key(api_key)
        if record is None:
            raise Unauthorized("invalid API key")
        now = int(time.time())
        subject = record.customer_id or admin_subject(record.prefix)
        claims: dict[str, Any] = {
            "sub": subject,
            "role": record.role.value,
            "cid": record.customer_id,
            "kid": record.prefix,
            "tier": await tier(record.customer_id) if record.customer_id else "admin",
            "iat": now,
            "exp": now + self._ttl,
        }
        token = jwt.encode(claims, self._secret, algorithm="HS256")
        principal = Principal(record.role, record.customer_id, subject, record.prefix, claims["tier"])
        return token, self._ttl, principal

    async def verify(self, token: str) -> Principal:
        """The caller behind a bearer token: signature, expiry and role checked, and the key not revoked."""
        try:
            claims = jwt.decode(
                token, self._secret, algorithms=["HS256"], options={"require": ["exp", "iat", "sub", "role", "kid"]}
            )
            role = Role(claims["role"])
        except jwt.ExpiredSignatureError:
            raise Unauthorized("token expired: exchange your API key for a new one with POST /v1/auth/token") from None
        except (jwt.InvalidTokenError, ValueError) as exc:
            if token.startswith(f"{_KEY_PREFIX}_"):  # (the key itself is not repeated)
                raise Unauthorized(
                    'this is an API key, not a token: exchange it for one with POST /v1/auth/token {"api_key": ...}'
                    " and send its access_token as the bearer"
                ) from None
            raise Unauthorized(f"invalid token: {exc} (send the access_token of POST /v1/auth/token)") from exc
        customer_id = claims.get("cid")
        if role is Role.CUSTOMER and not customer_id:
            raise Unauthorized("invalid token: customer token without a customer")
        if claims["kid"] in await self._revoked_prefixes():
            raise Unauthorized("invalid token: its API key was revoked")
        return Principal(role, customer_id, str(claims["sub"]), str(claims["kid"]), str(claims.get("tier", "standard")))

    async def _revoked_prefixes(self) -> frozenset[str]:
        """Revoked key prefixes, re-read at most every few seconds (tokens are checked on every request)."""
        now = time.monotonic()
        if now - self._revoked_at > _REVOCATION_REFRESH_S:
            keys = await self._keys.list()
            self._revoked = frozenset(k.prefix for k in keys if k.revoked_at is not None)
            self._revoked_at = now
        return self._revoked

    async def list_keys(self, customer_id: str | None = None) -> list[ApiKey]:
        keys = [k for k in await self._keys.list() if customer_id is None or k.customer_id == customer_id]
        return sorted(keys, key=lambda k: k.created_at)

    async def revoke(self, prefix: str) -> ApiKey:
        """Revoke the key; :class:`LastAdminKey` (changing nothing) if it is the last active admin key."""
        keys = await self._keys.list()
        key = next((k for k in keys if k.prefix == prefix), None)
        if key is None:
            shown = shown_prefix(prefix)
            hint = "" if shown == prefix else ": give the key's prefix (as GET /v1/admin/keys lists it), not the key"
            raise NotFound(f"no API key with prefix {shown!r}{hint}")
        if key.revoked_at is None:
            if key.role is Role.ADMIN:
                await self._claim_admin_revocation(key, keys)
            revoked = await self._keys.update(key.hash, lambda k: k.model_copy(update={"revoked_at": utcnow()}))
            key = revoked or key
        self._revoked_at = float("-inf")
        return key

    async def _claim_admin_revocation(self, key: ApiKey, keys: list[ApiKey]) -> None:
        """Record that ``key`` (an admin's) is revoked, unless no other active admin key would be left. ``keys``
        may be read before: an admin key revoked since is in the record, which this write is conditional on."""

        def claim(record: _AdminRevocations) -> _AdminRevocations | None:
            if key.hash in record.hashes:  # claimed by an attempt that stopped before it revoked the key
                return None
            revoked = {key.hash, *record.hashes}
            if not any(k.role is Role.ADMIN and k.revoked_at is None and k.hash not in revoked for k in keys):
                raise LastAdminKey(
                    f"{key.prefix} is the last active admin API key: revoking it would leave no admin access. "
                    "Start the control plane with CARAVAN_ADMIN_KEY set to a new key, then revoke this one."
                )
            return record.model_copy(update={"hashes": [*record.hashes, key.hash]})

        if await self._admin_revocations.update(_ADMIN_REVOCATIONS, claim) is None:
            with contextlib.suppress(AlreadyExists):  # made meanwhile by another revocation: changed below
                await self._admin_revocations.create(_ADMIN_REVOCATIONS, _AdminRevocations())
            await self._admin_revocations.update(_ADMIN_REVOCATIONS, claim)
