"""Individual consent routes: issue and revoke consents (admin), the 投保身份校验 under a
consent token and a DPoP proof (insurer), and the consent key set as JWKS (public).

Routes only translate HTTP; the use cases are :class:`gateway.service.gateway.Gateway`'s.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request
from pydantic import BaseModel, ConfigDict

from gateway.api.deps import CurrentPrincipal, GatewayDep
from gateway.api.responses import Json, audited_json
from gateway.service.consents import ConsentRequest

router = APIRouter()

ENROLLMENT_PATH = "/v1/persons/enrollment"


@router.get("/.well-known/jwks.json", tags=["consents"])
async def jwks(gateway: GatewayDep) -> Json:
    """The consent signing keys (pending and active), to verify consent tokens."""
    return Json(gateway.jwks(), headers={"Cache-Control": "max-age=300"})


@router.post("/v1/consents", status_code=201, tags=["consents"])
def create_consent(body: ConsentRequest, principal: CurrentPrincipal,
                   gateway: GatewayDep) -> Json:
    return audited_json(gateway.create_consent(principal, body), status_code=201)


@router.delete("/v1/consents/{consent_id}", tags=["consents"])
def revoke_consent(
    consent_id: Annotated[str, Path(min_length=1, max_length=128)],
    principal: CurrentPrincipal,
    gateway: GatewayDep,
) -> Json:
    return audited_json(gateway.revoke_consent(principal, consent_id))


class EnrollmentRequest(BaseModel):
    """The body is empty: the person and the scope come from the consent token."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@router.post(ENROLLMENT_PATH, tags=["persons"])
def enrollment(
    body: EnrollmentRequest,
    request: Request,
    principal: CurrentPrincipal,
    gateway: GatewayDep,
) -> Json:
    """投保身份校验. Headers: ``Authorization: Bearer <access token>``, ``Consent: <consent
    token>``, ``DPoP: <proof>`` (``htu`` = the gateway's base URL + this path)."""
    _, _, access_token = request.headers.get("authorization", "").partition(" ")
    base = gateway.consent.issuer if gateway.consent is not None else ""
    return audited_json(gateway.enrollment_check(
        principal,
        access_token=access_token.strip(),
        consent_token=request.headers.get("consent"),
        dpop_proof=request.headers.get("dpop"),
        htu=base + ENROLLMENT_PATH,
    ))
