"""Liveness, readiness and Prometheus metrics (no token needed)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.api.deps import GatewayDep
from gateway.api.metrics import REGISTRY
from gateway.api.responses import Json

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Liveness only: the process answers. Never touches the policy engine or the stores, so
    an OPA or database outage does not get the gateway restarted."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz(gateway: GatewayDep) -> Json:
    """Readiness: the policy engine (for OPA, a live probe of the server and of the data it
    holds), the query store and the state store. 503 with the failing checks named."""
    checks = gateway.readiness()
    ready = all(checks.values())
    body: dict[str, object] = {"status": "ready" if ready else "not_ready", "checks": checks}
    if not ready:
        failing = ", ".join(name for name, ok in checks.items() if not ok)
        body["error"] = {"code": "not_ready", "message": f"not ready: {failing}"}
    return Json(body, status_code=200 if ready else 503)


@router.get("/metrics")
def metrics() -> Response:
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
