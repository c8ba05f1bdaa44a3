from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, Field

from control.metrics import CONTENT_TYPE, Metrics, snapshot
from gateway.deps import ControlDep

router = APIRouter(tags=["health"])


@router.get("/healthz")  # load balancers probe with HEAD too: the app answers it on every GET route
async def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


class Readiness(BaseModel):
    status: Literal["ready", "not ready"]
    scheduler: str = Field(description="The scheduler backend: `local` or `nomad`.")


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={
        503: {"model": Readiness, "description": "Not ready: the control plane is starting or NATS does not answer."}
    },
)
async def readyz(control: ControlDep) -> JSONResponse:
    """The control plane is started and NATS answers it (a round trip within a second: a stalled server keeps
    its connections open)."""
    ready = await control.answering()
    body = {"status": "ready" if ready else "not ready", "scheduler": control.scheduler.name}
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(request: Request, control: ControlDep) -> PlainTextResponse:
    """Prometheus metrics (text format 0.0.4): API requests by method, route template and status, and their
    durations; agents and tasks by status, customers, killswitch flags engaged by scope, readiness. No label names
    a customer or an agent."""
    registry: Metrics = request.app.state.metrics
    return PlainTextResponse(registry.scrape(await snapshot(control)), media_type=CONTENT_TYPE)
