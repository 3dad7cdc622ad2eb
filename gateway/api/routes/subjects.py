"""The person's own view (subject role, signed in with the identity service's token)."""

from __future__ import annotations

from fastapi import APIRouter

from gateway.api.deps import GatewayDep
from gateway.api.responses import Json, audited_json
from gateway.api.routes.consents import CurrentSubject

__all__ = ["router"]

router = APIRouter()


@router.get("/v1/subjects/me/access", tags=["subjects"])
def my_access(subject: CurrentSubject, gateway: GatewayDep) -> Json:
    """Every audited call about this person's data — who, when, purpose, which fields,
    allowed or refused — and the person's live consents."""
    return audited_json(gateway.subject_access(subject))
