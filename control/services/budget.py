"""The daily token budget's hold on a customer: engaged when they go over ``tokens_per_day``, released when that
UTC day ends, or at once when an operator's quota change leaves them tokens today.

The hold is a customer-scope killswitch engaged by ``system:token-budget``. Its release time is kept with the
engagement's flag id in KV (bucket ``system``, key ``budget_hold.<customer id>``), so that a control plane
started again releases it too, and releases only that engagement: a flag an operator engaged over it has
another id and stays. One timer per hold sleeps until its release time.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import UTC, datetime, time, timedelta
from typing import Protocol

from pydantic import BaseModel

from agent.aio import cancel_and_wait
from agent.backends.base import Flag, FlagKey, Scope
from control.errors import NotFound
from control.models import Role
from control.services.auth import Principal
from control.services.killswitch import FlagHeld, KillswitchRequest, KillswitchService
from control.store import Repo

__all__ = ["BUDGET_ACTOR", "BudgetHold", "BudgetHolds", "Clock", "SystemClock", "budget_day_end"]

log = logging.getLogger("caravan.control.budget")

BUDGET_ACTOR = "system:token-budget"
"""Who engages and releases a budget's hold, in flags and the audit log."""
_PRINCIPAL = Principal(Role.ADMIN, None, BUDGET_ACTOR)
_KEY_PREFIX = "budget_hold."
_RETRY = timedelta(seconds=30)
_CLAIM = timedelta(seconds=60)


class Clock(Protocol):
    """The time a budget's day is read from (tests hand in one they move by hand)."""

    def now(self) -> datetime:
        """The current time, timezone-aware."""

    async def sleep_until(self, when: datetime) -> None:
        """Return once :meth:`now` has reached ``when``."""


class SystemClock:
    _MAX_NAP_S = 3600.0  # the wall clock may be set meanwhile: look again at least this often

    def now(self) -> datetime:
        return datetime.now(UTC)

    async def sleep_until(self, when: datetime) -> None:
        while True:
            remaining = (when - self.now()).total_seconds()
            if remaining <= 0:
                return
            await asyncio.sleep(min(remaining, self._MAX_NAP_S))


class BudgetHold(BaseModel):
    customer_id: str
    flag_id: str
    lifts_at: datetime
    lifting_until: datetime | None = None  # a control plane releases it now (until then: another may, after)
    lifting_by: str | None = None  # which one


def budget_day_end(now: datetime) -> datetime:
    """When the UTC day of ``now`` ends, and with it a budget's hold (``tokens_per_day`` counts per UTC day)."""
    return datetime.combine(now.astimezone(UTC).date() + timedelta(days=1), time(), tzinfo=UTC)


class BudgetHolds:
    """``start()`` takes up the holds kept in KV (releasing those whose day is over); ``stop()`` cancels the
    timers and leaves the holds to the next start."""

    def __init__(
        self, repo: Repo[BudgetHold], killswitch: KillswitchService, clock: Clock, look_again_s: float = 300.0
    ) -> None:
        self._repo = repo
        self._killswitch = killswitch
        self._clock = clock
        self._look_again_s = look_again_s
        self._id = uuid.uuid4().hex  # this control plane's, in the claims of the holds it releases
        self._timers: dict[str, asyncio.Task[None]] = {}
        self._looking: asyncio.Task[None] | None = None

    async def start(self) -> None:
        held = {hold.customer_id: hold for hold in await self._repo.list(f"{_KEY_PREFIX}*")}
        for flag in await self._killswitch.engaged():
            if flag.scope is Scope.CUSTOMER and flag.by == BUDGET_ACTOR and flag.target and flag.target not in held:
                held[flag.target] = await self._adopt(flag)  # engaged, then stopped before its hold was kept
        for hold in held.values():
            self._schedule(hold)
        self._looking = asyncio.create_task(self._look_again(), name="budget-holds")

    async def stop(self) -> None:
        if self._looking is not None:
            await cancel_and_wait(self._looking)
        for timer in list(self._timers.values()):
            await cancel_and_wait(timer)
        self._timers.clear()

    async def _look_again(self) -> None:
        """Every ``look_again_s``, take up the holds another control plane engaged: each replica times every hold
        (the first to claim one releases it), so a hold is released even if the replica that engaged it is gone."""
        while True:
            await asyncio.sleep(self._look_again_s)
            try:
                for hold in await self._repo.list(f"{_KEY_PREFIX}*"):
                    if hold.customer_id not in self._timers:
                        self._schedule(hold)
            except Exception:  # NATS away for a while: looked at again next time
                log.exception("could not read the token budget's holds")

    async def engage(self, customer_id: str, total: int, budget: int) -> None:
        """Halt the customer until their budget's day ends, unless a halt already holds them: someone else's
        (checked as the flag is written: an operator's engagement is never replaced, nor lifted at midnight), or
        the budget's own (its hold kept, if it was not)."""
        current = await self._current(customer_id)
        if current is not None and current.by == BUDGET_ACTOR:
            if await self._repo.get(_KEY_PREFIX + customer_id) is None:  # its hold was never kept: keep it now
                self._schedule(await self._adopt(current))
            return  # kept: every control plane times it
        if current is not None:
            log.info("customer %s is over their token budget and already halted by %s", customer_id, current.by)
            return
        lifts_at = budget_day_end(self._clock.now())
        reason = (
            f"daily token budget of {budget} tokens exceeded ({total} used today); "
            f"lifts at {lifts_at:%Y-%m-%d %H:%M} UTC"
        )
        request = KillswitchRequest(scope=Scope.CUSTOMER, customer_id=customer_id, reason=reason)
        try:
            result = await self._killswitch.apply(_PRINCIPAL, request, unless_engaged=True)
        except FlagHeld:  # an operator engaged theirs since it was looked at
            log.info("customer %s is over their token budget and was just halted by someone else", customer_id)
            return
        assert result.flag_id is not None
        hold = BudgetHold(customer_id=customer_id, flag_id=result.flag_id, lifts_at=lifts_at)
        await self._repo.put(_KEY_PREFIX + customer_id, hold)
        self._schedule(hold)

    async def release(self, customer_id: str, why: str) -> None:
        """Lift the budget's own halt on the customer now (their quota changed, leaving them tokens today), as its
        day's end would: one an operator engaged stays."""
        hold = await self._repo.get(_KEY_PREFIX + customer_id)
        if hold is None:
            current = await self._current(customer_id)
            if current is None or current.by != BUDGET_ACTOR:
                return
            hold = await self._adopt(current)  # engaged, then stopped before its hold was kept
        await self._lift(hold, why)  # its timer finds it gone when it is due

    async def _adopt(self, flag: Flag) -> BudgetHold:
        assert flag.target is not None
        hold = BudgetHold(customer_id=flag.target, flag_id=flag.id, lifts_at=budget_day_end(flag.at))
        await self._repo.put(_KEY_PREFIX + flag.target, hold)
        return hold

    async def _current(self, customer_id: str) -> Flag | None:
        key = FlagKey(Scope.CUSTOMER, customer_id)
        return next((f for f in await self._killswitch.engaged() if f.key == key), None)

    def _schedule(self, hold: BudgetHold) -> None:
        previous = self._timers.pop(hold.customer_id, None)
        if previous is not None:
            previous.cancel()
        timer = asyncio.create_task(self._lift_when_due(hold), name=f"budget-hold-{hold.customer_id}")
        self._timers[hold.customer_id] = timer
        timer.add_done_callback(self._forget_timer)

    def _forget_timer(self, timer: asyncio.Task[None]) -> None:
        for customer_id, current in list(self._timers.items()):
            if current is timer:
                del self._timers[customer_id]

    async def _lift_when_due(self, hold: BudgetHold) -> None:
        due = hold.lifts_at
        while True:
            await self._clock.sleep_until(due)
            try:
                await self._lift(hold, f"daily token budget renewed at {hold.lifts_at:%Y-%m-%d %H:%M} UTC")
                return
            except Exception:  # the flag store or NATS away for a while: the hold stays, and is tried again
                log.exception("could not release the token budget's hold on customer %s", hold.customer_id)
                due = self._clock.now() + _RETRY

    async def _lift(self, hold: BudgetHold, why: str) -> None:
        """Release the hold's own engagement (not one engaged over it since), then forget the hold. Claimed first:
        of the control planes timing it, one releases it (another does once a claim is ``_CLAIM`` old)."""
        key, claim_until = _KEY_PREFIX + hold.customer_id, self._clock.now() + _CLAIM

        def claim(stored: BudgetHold) -> BudgetHold | None:
            if stored.flag_id != hold.flag_id or (stored.lifting_until and stored.lifting_until > self._clock.now()):
                return None
            return stored.model_copy(update={"lifting_until": claim_until, "lifting_by": self._id})

        claimed = await self._repo.update(key, claim)
        if claimed is None or (claimed.lifting_by, claimed.lifting_until) != (self._id, claim_until):
            return  # released already, or being released by another control plane
        current = await self._current(hold.customer_id)
        if current is not None and current.id == hold.flag_id:
            request = KillswitchRequest(
                scope=Scope.CUSTOMER,
                customer_id=hold.customer_id,
                engaged=False,
                reason=why,
            )
            try:
                await self._killswitch.apply(_PRINCIPAL, request, only=hold.flag_id)
            except NotFound:  # the customer was deleted meanwhile: nobody is left to release
                log.info("customer %s is gone: their token budget's hold is forgotten", hold.customer_id)
            except FlagHeld:  # an operator engaged theirs over it since it was looked at: it stays
                log.info("customer %s: an operator's halt took the budget's place; it stays", hold.customer_id)
        stored = await self._repo.get(_KEY_PREFIX + hold.customer_id)
        if stored is not None and stored.flag_id == hold.flag_id:
            await self._repo.delete(_KEY_PREFIX + hold.customer_id)
