from __future__ import annotations

from datetime import datetime
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, Field

from control.backends.base import EventFeed, event_feed
from control.metrics import CONTENT_TYPE, Metrics, snapshot
from gateway.deps import ControlDep

router = APIRouter(tags=["health"])


@router.get("/healthz")  # load balancers probe with HEAD too: the app answers it on every GET route
async def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


class SchedulerEvents(BaseModel):
    state: Literal["connected", "reconnecting"] = Field(
        description="`connected`: the scheduler follows the cluster's changes (Nomad's event stream); "
        "`reconnecting`: it does not yet, or lost them, and agents' statuses may be stale until it is back."
    )
    since: datetime = Field(description="When it connected, or when it was lost (or the scheduler started).")
    last_error: str | None = Field(
        description="What kind of failure the last attempt was, in fixed words (null while connected): "
        "`unauthorized (403)` or `(401)` (Nomad refuses the token), `HTTP <status>` (another answer from Nomad or a "
        "proxy in front of it), `unreachable` (no answer), `connection lost` (an open stream broke off), `stream "
        "ended` (Nomad or a proxy ended it). Nomad's or the network's own words, which may name addresses, are in "
        "the log only: this probe answers anyone."
    )
    failed_attempts: int = Field(description="Attempts that failed since it was last connected.")

    @classmethod
    def of(cls, feed: EventFeed) -> SchedulerEvents:
        state: Literal["connected", "reconnecting"] = "connected" if feed.connected else "reconnecting"
        return cls(state=state, since=feed.since, last_error=feed.last_error_kind, failed_attempts=feed.failures)


class Readiness(BaseModel):
    status: Literal["ready", "not ready"]
    scheduler: str = Field(description="The scheduler backend: `local` or `nomad`.")
    scheduler_events: SchedulerEvents | None = Field(
        default=None,
        description="The feed agents' statuses come from (`nomad`: its event stream); null for the `local` "
        "scheduler, which watches its own processes. It does not make the API not ready: the API still serves, and "
        "the statuses catch up when it is back.",
    )


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={
        503: {"model": Readiness, "description": "Not ready: the control plane is starting or NATS does not answer."}
    },
)
async def readyz(control: ControlDep) -> JSONResponse:
    """The control plane is started and NATS answers it (a round trip within a second: a stalled server keeps
    its connections open). The scheduler's event feed is reported, but does not decide readiness: without it the
    API still serves and tasks still run (over NATS); only agents' statuses wait, and a probe that failed for it
    would take every replica out of service for a Nomad outage or a wrong token, which no restart mends."""
    ready = await control.answering()
    feed = event_feed(control.scheduler)
    body = Readiness(
        status="ready" if ready else "not ready",
        scheduler=control.scheduler.name,
        scheduler_events=None if feed is None else SchedulerEvents.of(feed),
    )
    return JSONResponse(body.model_dump(mode="json"), status_code=200 if ready else 503)


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(request: Request, control: ControlDep) -> PlainTextResponse:
    """Prometheus metrics (text format 0.0.4): API requests by method, route template and status, and their
    durations; agents and tasks by status, customers, killswitch flags engaged by scope, readiness. No label names
    a customer or an agent."""
    registry: Metrics = request.app.state.metrics
    return PlainTextResponse(registry.scrape(await snapshot(control)), media_type=CONTENT_TYPE)
