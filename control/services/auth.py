"""Customers, API keys and short-lived JWTs.

An API key is shown once: only its SHA-256 is stored (keys are 256-bit random, so a fast hash is the
right tool), keyed by that hash, with a visible prefix that identifies it in lists and logs.
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import time
from dataclasses import dataclass
from typing import Any

import jwt
from nats.js.errors import KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from control.errors import NotFound, Unauthorized
from control.ids import is_plain_id, new_id
from control.models import ApiKey, Customer, Role
from control.store import AlreadyExists, Repo

__all__ = ["AuthService", "IssuedKey", "Principal"]

_KEY_PREFIX = "cvn"


@dataclass(frozen=True)
class Principal:
    role: Role
    customer_id: str | None
    subject: str

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN


@dataclass(frozen=True)
class IssuedKey:
    api_key: str
    prefix: str


def _hash(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


class AuthService:
    def __init__(self, keys: Repo[ApiKey], customers: Repo[Customer], system: KeyValue, ttl_seconds: int) -> None:
        self._keys = keys
        self._customers = customers
        self._system = system
        self._ttl = ttl_seconds
        self._secret = ""

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

    async def issue_key(self, role: Role, customer_id: str | None, api_key: str | None = None) -> IssuedKey:
        key = api_key or f"{_KEY_PREFIX}_{secrets.token_hex(4)}_{secrets.token_urlsafe(32)}"
        prefix = key[:12]
        record = ApiKey(prefix=prefix, hash=_hash(key), role=role, customer_id=customer_id)
        try:
            await self._keys.create(record.hash, record)
        except AlreadyExists:
            existing = await self._keys.get(record.hash)
            if existing is None or existing.role != role or existing.customer_id != customer_id:
                raise
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
            raise NotFound(f"customer {customer_id!r} not found")
        return customer

    async def list_customers(self) -> list[Customer]:
        return sorted(await self._customers.list(), key=lambda c: c.created_at)

    async def token_for_key(self, api_key: str) -> tuple[str, int, Principal]:
        record = await self._keys.get(_hash(api_key)) if 16 <= len(api_key) <= 256 else None
        if record is None or record.revoked_at is not None:
            raise Unauthorized("invalid API key")
        if record.customer_id is not None and await self._customers.get(record.customer_id) is None:
            raise Unauthorized("invalid API key")
        now = int(time.time())
        subject = record.customer_id or f"admin:{record.prefix}"
        claims: dict[str, Any] = {
            "sub": subject,
            "role": record.role.value,
            "cid": record.customer_id,
            "kid": record.prefix,
            "iat": now,
            "exp": now + self._ttl,
        }
        token = jwt.encode(claims, self._secret, algorithm="HS256")
        return token, self._ttl, Principal(record.role, record.customer_id, subject)

    def verify(self, token: str) -> Principal:
        try:
            claims = jwt.decode(
                token, self._secret, algorithms=["HS256"], options={"require": ["exp", "iat", "sub", "role"]}
            )
            role = Role(claims["role"])
        except (jwt.InvalidTokenError, ValueError) as exc:
            raise Unauthorized(f"invalid token: {exc}") from exc
        customer_id = claims.get("cid")
        if role is Role.CUSTOMER and not customer_id:
            raise Unauthorized("invalid token: customer token without a customer")
        return Principal(role, customer_id, str(claims["sub"]))
