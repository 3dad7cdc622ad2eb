"""Auditor routes: search the log, the signed checkpoint, inclusion and consistency proofs.

Proofs are RFC 6962 / RFC 9162 shaped (base64 hashes, bottom first) so any transparency-log
verifier can check them against a checkpoint.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import PlainTextResponse

from gateway.api.deps import CurrentPrincipal, GatewayDep
from gateway.api.responses import Json, audited_json

router = APIRouter(prefix="/v1/audit", tags=["audit"])


@router.get("/entries")
def audit_entries(
    principal: CurrentPrincipal,
    gateway: GatewayDep,
    actor: Annotated[str | None, Query(max_length=128)] = None,
    org: Annotated[str | None, Query(max_length=64)] = None,
    purpose: Annotated[str | None, Query(max_length=64)] = None,
    action: Annotated[str | None, Query(max_length=64)] = None,
    decision: Annotated[str | None, Query(pattern="^(allow|deny|error)$")] = None,
    subject_pseudonym: Annotated[str | None, Query(max_length=128)] = None,
    since: Annotated[str | None, Query(max_length=40)] = None,
    until: Annotated[str | None, Query(max_length=40)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> Json:
    filters: dict[str, Any] = {
        "actor": actor, "org": org, "purpose": purpose, "action": action,
        "decision": decision, "subject_pseudonym": subject_pseudonym,
        "since": since, "until": until,
    }
    return audited_json(gateway.audit_entries(principal, filters, limit=limit, offset=offset))


@router.get("/checkpoint", response_class=PlainTextResponse)
def checkpoint(principal: CurrentPrincipal, gateway: GatewayDep) -> PlainTextResponse:
    result = gateway.audit_checkpoint(principal)
    return PlainTextResponse(result.body, media_type="text/plain; charset=utf-8",
                             headers={"Audit-Index": str(result.audit_id)})


@router.get("/proof/inclusion")
def inclusion_proof(
    principal: CurrentPrincipal,
    gateway: GatewayDep,
    index: Annotated[int, Query(ge=0)],
    tree_size: Annotated[int, Query(ge=1)],
) -> Json:
    return audited_json(gateway.audit_inclusion(principal, index, tree_size))


@router.get("/proof/consistency")
def consistency_proof(
    principal: CurrentPrincipal,
    gateway: GatewayDep,
    first: Annotated[int, Query(ge=1)],
    second: Annotated[int, Query(ge=1)],
) -> Json:
    return audited_json(gateway.audit_consistency(principal, first, second))
