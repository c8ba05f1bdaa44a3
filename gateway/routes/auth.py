from __future__ import annotations

from fastapi import Request

from control.errors import Unauthorized
from control.services.audit import AuditRecord
from gateway.deps import ControlDep, check_failures
from gateway.routes import api_router
from gateway.schemas import TokenRequest, TokenResponse

router = api_router("/v1/auth", "auth")


@router.post("/token", response_model=TokenResponse)
async def issue_token(body: TokenRequest, request: Request, control: ControlDep) -> TokenResponse:
    """Exchange an API key for a short-lived JWT carrying the role and the customer. Every attempt is audited
    (by the key's public prefix; the key itself is never recorded), except those of an address that failed too
    often, which get 429 unchecked."""
    prefix = body.api_key[:12] if body.api_key.startswith("cvn_") else "unrecognised"
    client = request.client.host if request.client else None
    check_failures(request, take=False)
    try:
        token, ttl, principal = await control.auth.token_for_key(body.api_key, control.quotas.tier)
    except Unauthorized:
        check_failures(request)
        record = AuditRecord(
            actor=f"key:{prefix}", role="unknown", action="auth.token", result="denied", details={"client": client}
        )
        await control.audit.append(record)
        raise
    await control.audit.append(
        AuditRecord(
            actor=principal.subject,
            role=principal.role.value,
            action="auth.token",
            customer_id=principal.customer_id,
            details={"key": principal.key_prefix, "client": client},
        )
    )
    return TokenResponse(access_token=token, expires_in=ttl, role=principal.role.value)
