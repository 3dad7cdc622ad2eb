"""Individual consent routes: issue and revoke consents (an admin on a person's behalf, or the
person), the 投保身份校验 and the person's settlements under a consent token and a DPoP proof
(insurer), and the consent key set as JWKS (public).

Routes only translate HTTP; the use cases are :class:`gateway.service.gateway.Gateway`'s.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool

from gateway.api.deps import (
    DirectRoute,
    GatewayDep,
    get_principal,
    json_body,
    json_body_openapi,
)
from gateway.api.responses import Json, audited_json
from gateway.auth.subjects import SUBJECT_TYP
from gateway.auth.tokens import Principal
from gateway.errors import AuthenticationFailed
from gateway.service.consents import ConsentRequest, SettlementsRequest, SubjectCaller
from gateway.service.gateway import Gateway

__all__ = ["ENROLLMENT_PATH", "SETTLEMENTS_PATH", "CurrentSubject", "persons", "router"]

router = APIRouter()
# The person endpoints: the gateway's busiest, answered by their endpoints directly.
persons = APIRouter(route_class=DirectRoute)

ENROLLMENT_PATH = "/v1/persons/enrollment"
SETTLEMENTS_PATH = "/v1/persons/settlements"


def _bearer(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _typ(token: str) -> object:
    """The ``typ`` of a compact JWS header, read only to route it to its verifier (the
    verifier checks everything again)."""
    segment = token.split(".", 1)[0]
    try:
        header = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (ValueError, binascii.Error):
        return None
    return header.get("typ") if isinstance(header, dict) else None


async def get_subject(request: Request, gateway: GatewayDep) -> SubjectCaller:
    """A person signed in with the identity service's token; a failure is audited (as
    anonymous) before the 401."""
    token = _bearer(request)
    try:
        if token is None:
            raise AuthenticationFailed("missing bearer token")
        # The person lookup is one store read: off the event loop.
        return await run_in_threadpool(gateway.subject_sign_in, token)
    except AuthenticationFailed as exc:
        await run_in_threadpool(
            gateway.record, None, f"auth:{request.method} {request.url.path}", status=401,
            decision="deny", error_code=exc.code, reasons=[exc.message],
        )
        raise


CurrentSubject = Annotated[SubjectCaller, Depends(get_subject)]


async def get_consent_caller(request: Request, gateway: GatewayDep
                             ) -> Principal | SubjectCaller:
    """Consents are managed by admins (access token) and by persons (subject token)."""
    token = _bearer(request)
    if token is not None and _typ(token) == SUBJECT_TYP:
        return await get_subject(request, gateway)
    return await get_principal(request, gateway)


ConsentCaller = Annotated[Principal | SubjectCaller, Depends(get_consent_caller)]


@router.get("/.well-known/jwks.json", tags=["consents"])
async def jwks(gateway: GatewayDep) -> Json:
    """The consent signing keys (pending and active), to verify consent tokens."""
    return Json(gateway.jwks(), headers={"Cache-Control": "max-age=300"})


@router.post("/v1/consents", status_code=201, tags=["consents"])
def create_consent(body: ConsentRequest, caller: ConsentCaller, gateway: GatewayDep) -> Json:
    """An admin names the person by ``certno`` (身份证号); a signed-in person omits it."""
    return audited_json(gateway.create_consent(caller, body), status_code=201)


@router.delete("/v1/consents/{consent_id}", tags=["consents"])
def revoke_consent(
    consent_id: Annotated[str, Path(min_length=1, max_length=128)],
    caller: ConsentCaller,
    gateway: GatewayDep,
) -> Json:
    return audited_json(gateway.revoke_consent(caller, consent_id))


class EnrollmentRequest(BaseModel):
    """The body is empty: the person and the scope come from the consent token."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _proofs(request: Request, gateway: Gateway, path: str) -> dict[str, Any]:
    """What a person endpoint hands its use case from the headers: the bearer token (for the
    proof's ``ath``), the consent token, the DPoP proof and the URI the proof must name."""
    base = gateway.consent.issuer if gateway.consent is not None else ""
    return {"access_token": _bearer(request) or "",
            "consent_token": request.headers.get("consent"),
            "dpop_proof": request.headers.get("dpop"), "htu": base + path}


@persons.post(ENROLLMENT_PATH, tags=["persons"],
             openapi_extra=json_body_openapi(EnrollmentRequest))
async def enrollment(request: Request) -> Json:
    """投保身份校验. Headers: ``Authorization: Bearer <access token>``, ``Consent: <consent
    token>``, ``DPoP: <proof>`` (``htu`` = the gateway's base URL + this path)."""
    gateway: Gateway = request.app.state.gateway
    principal = await get_principal(request, gateway)
    await json_body(request, EnrollmentRequest)
    return audited_json(await gateway.enrollment_check(
        principal, **_proofs(request, gateway, ENROLLMENT_PATH)))


@persons.post(SETTLEMENTS_PATH, tags=["persons"],
             openapi_extra=json_body_openapi(SettlementsRequest))
async def settlements(request: Request) -> Json:
    """线上快速理赔: the person's settlements in ``period``, only the released fields. Same
    headers as the enrollment check; the consent must be a ``claims_fast_track`` one."""
    gateway: Gateway = request.app.state.gateway
    principal = await get_principal(request, gateway)
    body = await json_body(request, SettlementsRequest)
    return audited_json(await gateway.persons_settlements(
        principal, body, **_proofs(request, gateway, SETTLEMENTS_PATH)))
