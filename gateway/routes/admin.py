from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query, status

from agent.backends.base import Flag
from control.models import CustomerCreate
from control.services.audit import AuditQuery, AuditRecord
from control.services.killswitch import KillswitchRequest, KillswitchResult
from gateway.deps import AdminDep, ControlDep
from gateway.schemas import CustomerCreated, CustomerPublic

router = APIRouter(prefix="/v1/admin", tags=["admin"])


@router.post("/customers", response_model=CustomerCreated, status_code=status.HTTP_201_CREATED)
async def create_customer(body: CustomerCreate, control: ControlDep, _: AdminDep) -> CustomerCreated:
    """Create a tenant and its first API key (shown once)."""
    customer, key = await control.auth.create_customer(body.name)
    return CustomerCreated(**customer.model_dump(), api_key=key.api_key, api_key_prefix=key.prefix)


@router.get("/customers", response_model=list[CustomerPublic])
async def list_customers(control: ControlDep, _: AdminDep) -> list[CustomerPublic]:
    return [CustomerPublic(**c.model_dump()) for c in await control.auth.list_customers()]


@router.post("/killswitch", response_model=KillswitchResult)
async def set_killswitch(body: KillswitchRequest, control: ControlDep, admin: AdminDep) -> KillswitchResult:
    """Engage or release the killswitch for every agent, one customer's agents, or one agent.

    Waits up to `wait_ms` for the covered agents to acknowledge and says which did not; with `hard`, also
    stops their jobs. Flags are durable: an agent that starts under an engaged flag starts halted."""
    return await control.killswitch.apply(admin, body)


@router.get("/killswitch", response_model=list[Flag])
async def get_killswitch(control: ControlDep, _: AdminDep) -> list[Flag]:
    """What is engaged, by whom, when and why."""
    return await control.killswitch.engaged()


@router.get("/audit", response_model=list[AuditRecord])
async def get_audit(
    control: ControlDep,
    _: AdminDep,
    actor: Annotated[str | None, Query(max_length=200)] = None,
    action: Annotated[str | None, Query(max_length=100, pattern=r"^[a-z_]+(\.[a-z_]+)*$")] = None,
    customer_id: Annotated[str | None, Query(max_length=64)] = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[AuditRecord]:
    """The audit log, oldest first (the newest `limit` matches). Append-only: nothing deletes records."""
    query = AuditQuery(actor=actor, action=action, customer_id=customer_id, since=since, until=until, limit=limit)
    return await control.audit.query(query)
