from __future__ import annotations

from fastapi import APIRouter

from gateway.deps import ControlDep
from gateway.schemas import TokenRequest, TokenResponse

router = APIRouter(prefix="/v1/auth", tags=["auth"])


@router.post("/token", response_model=TokenResponse)
async def issue_token(body: TokenRequest, control: ControlDep) -> TokenResponse:
    """Exchange an API key for a short-lived JWT carrying the role and the customer."""
    token, ttl, principal = await control.auth.token_for_key(body.api_key)
    return TokenResponse(access_token=token, expires_in=ttl, role=principal.role.value)
