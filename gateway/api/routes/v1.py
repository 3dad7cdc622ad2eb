"""The v1 routes: translate HTTP to use cases of :class:`gateway.service.gateway.Gateway`."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field

from gateway.api.deps import CurrentPrincipal, GatewayDep
from gateway.api.responses import Json, audited_json
from gateway.query.spec import AggregateQuery
from gateway.service.gateway import Audited
from gateway.service.grants import GrantRequest

router = APIRouter(prefix="/v1")


@router.get("/catalog", tags=["catalog"])
def read_catalog(principal: CurrentPrincipal, gateway: GatewayDep) -> Json:
    return audited_json(gateway.catalog_for(principal))


@router.post("/grants", status_code=201, tags=["grants"])
def create_grant(
    body: GrantRequest, principal: CurrentPrincipal, gateway: GatewayDep
) -> Json:
    return audited_json(gateway.create_grant(principal, body), status_code=201)


@router.get("/grants", tags=["grants"])
def list_grants(
    principal: CurrentPrincipal,
    gateway: GatewayDep,
    insurer: Annotated[str | None, Query(max_length=64)] = None,
) -> Json:
    result = gateway.list_grants(principal, insurer)
    return audited_json(Audited({"grants": result.body}, result.audit_id))


@router.delete("/grants/{grant_id}", tags=["grants"])
def revoke_grant(grant_id: str, principal: CurrentPrincipal, gateway: GatewayDep) -> Json:
    return audited_json(gateway.revoke_grant(principal, grant_id))


@router.post("/query/aggregate", tags=["query"])
def aggregate(body: AggregateQuery, principal: CurrentPrincipal, gateway: GatewayDep) -> Json:
    return audited_json(gateway.aggregate(principal, body))


class SqlRequest(BaseModel):
    """``{purpose, sql}``: one SELECT in the allowed subset (see docs/sql.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    purpose: str = Field(min_length=1, max_length=64)
    sql: str = Field(min_length=1, max_length=20_000)


@router.post("/query/sql", tags=["query"])
def sql_query(body: SqlRequest, principal: CurrentPrincipal, gateway: GatewayDep) -> Json:
    return audited_json(gateway.sql_query(principal, body.purpose, body.sql))
