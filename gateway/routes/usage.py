from __future__ import annotations

from fastapi import APIRouter

from control.errors import Invalid
from control.services.quotas import UsagePublic
from gateway.deps import ControlDep, PrincipalDep
from gateway.schemas import ERROR_RESPONSES

router = APIRouter(prefix="/v1", tags=["usage"], responses=ERROR_RESPONSES)


@router.get("/usage", response_model=UsagePublic)
async def my_usage(control: ControlDep, principal: PrincipalDep) -> UsagePublic:
    """The caller's quota and what it uses now: agents, CPU, memory, tasks in flight, tokens today."""
    if principal.customer_id is None:
        raise Invalid("usage is per customer: admins see it at /v1/admin/customers/{id}")
    return await control.quotas.usage(principal.customer_id)
