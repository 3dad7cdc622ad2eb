"""``POST /v1/pricing/simulate``: translate HTTP to :func:`gateway.service.pricing.simulate`."""

from __future__ import annotations

from fastapi import APIRouter

from gateway.api.deps import CurrentPrincipal, GatewayDep
from gateway.api.responses import Json, audited_json
from gateway.pricing.request import PricingRequest
from gateway.service import pricing

router = APIRouter(prefix="/v1")


@router.post("/pricing/simulate", tags=["pricing"])
def simulate(body: PricingRequest, principal: CurrentPrincipal, gateway: GatewayDep) -> Json:
    return audited_json(pricing.simulate(gateway, principal, body))
