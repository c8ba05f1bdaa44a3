from __future__ import annotations

from control.services.quotas import UsagePublic
from gateway.deps import ControlDep, PrincipalDep, customer_only
from gateway.routes import api_router

router = api_router("/v1", "usage")


@router.get("/usage", response_model=UsagePublic)
async def my_usage(control: ControlDep, principal: PrincipalDep) -> UsagePublic:
    """The caller's quota and what it uses now: agents, CPU, memory, tasks in flight, tokens today."""
    customer_id = customer_only(principal, "an admin reads a customer's usage at /v1/admin/customers/{id}")
    return await control.quotas.usage(customer_id)
