"""Per-caller request rate limits by tier: a token bucket per API key, answered with 429 and Retry-After."""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from control.errors import CaravanError

__all__ = ["FAILED_AUTH", "TIERS", "RateLimited", "RateLimiter", "Tiers"]

FAILED_AUTH = "failed-auth"
"""The bucket of failed authentications per client address: once it is empty, the client's attempts are refused
with 429 before any key or token is checked or audited (the audit log cannot be flooded, keys not guessed)."""


@dataclass(frozen=True)
class Rate:
    per_second: float
    burst: int


TIERS: dict[str, Rate] = {
    "free": Rate(per_second=5, burst=20),
    "standard": Rate(per_second=20, burst=60),
    "enterprise": Rate(per_second=100, burst=300),
    FAILED_AUTH: Rate(per_second=1, burst=20),
}


class RateLimited(CaravanError):
    status = 429
    code = "rate_limited"

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message, {"retry_after_s": retry_after})
        self.retry_after = retry_after
        self.headers = {"Retry-After": str(retry_after)}


class RateLimiter:
    """One bucket per caller (an API key's prefix), refilled continuously at its tier's rate. In memory: each
    gateway replica limits on its own, so the cluster-wide rate is at most replicas times the tier's."""

    def __init__(self, tiers: dict[str, Rate] | None = None, scale: float = 1.0) -> None:
        base = tiers or TIERS
        self._tiers = {name: Rate(r.per_second * scale, max(1, int(r.burst * scale))) for name, r in base.items()}
        self._buckets: dict[str, tuple[float, float]] = {}

    def check(self, caller: str, tier: str, take: bool = True) -> None:
        """Take one request from the caller's bucket (without ``take``: only refuse if it is empty)."""
        rate = self._tiers.get(tier)
        if rate is None:  # admins, and tiers without a limit
            return
        now = time.monotonic()
        tokens, last = self._buckets.get(caller, (float(rate.burst), now))
        tokens = min(float(rate.burst), tokens + (now - last) * rate.per_second)
        if tokens < 1:
            wait = math.ceil((1 - tokens) / rate.per_second)
            self._buckets[caller] = (tokens, now)
            raise RateLimited(f"rate limit of the {tier} tier ({rate.per_second:g}/s) reached; retry later", wait)
        if take:  # a look leaves no bucket behind: callers that never failed keep none
            self._buckets[caller] = (tokens - 1, now)
        if len(self._buckets) > 100_000:  # forget idle callers rather than grow without bound
            self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < 60}


class Tiers:
    """Each customer's tier as their quota says now, not as it was when their token was issued (a token lives an
    hour): read again once it is ``ttl_s`` old, so a change of tier reaches every gateway replica within that, and
    the replica that made it at once (:meth:`forget`)."""

    def __init__(self, ttl_s: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl_s = ttl_s
        self._clock = clock
        self._known: dict[str, tuple[str, float]] = {}

    async def of(self, customer_id: str, read: Callable[[str], Awaitable[str]]) -> str:
        now = self._clock()
        known = self._known.get(customer_id)
        if known is not None and now - known[1] < self._ttl_s:
            return known[0]
        tier = await read(customer_id)
        self._known[customer_id] = (tier, now)
        return tier

    def forget(self, customer_id: str) -> None:
        self._known.pop(customer_id, None)
