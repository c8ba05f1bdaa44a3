from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from gateway.deps import ControlDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(control: ControlDep) -> JSONResponse:
    """The control plane is started and connected to NATS."""
    ready = control.ready
    body = {"status": "ready" if ready else "not ready", "scheduler": control.scheduler.name}
    return JSONResponse(body, status_code=200 if ready else 503)
