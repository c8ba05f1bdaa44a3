from __future__ import annotations

from fastapi import APIRouter, status

from control.models import CustomerCreate
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
