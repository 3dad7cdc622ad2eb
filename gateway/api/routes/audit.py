"""Auditor routes: search the log, the signed checkpoint, inclusion and consistency proofs,
alerts and reports.

Proofs are RFC 6962 / RFC 9162 shaped (base64 hashes, bottom first) so any transparency-log
verifier can check them against a checkpoint.
"""

from __future__ import annotations

import re
import threading
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import PlainTextResponse

from gateway.api.deps import CurrentPrincipal, GatewayDep
from gateway.api.responses import Json, audited_json
from gateway.audit.alerts import RULES
from gateway.service.monitoring import (
    MAX_ALERTS_LIMIT,
    Monitor,
    ReportFormat,
    audit_report,
    list_alerts,
)

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


_monitor_lock = threading.Lock()


async def _monitor(request: Request, gateway: GatewayDep) -> Monitor:
    """``app.state.monitor`` (created and started with the app); if the app was built without
    one, one is made on first use, fed only by the reads (it catches up before each)."""
    monitor: Monitor | None = getattr(request.app.state, "monitor", None)
    if monitor is None:
        with _monitor_lock:
            monitor = getattr(request.app.state, "monitor", None)
            if monitor is None:
                monitor = request.app.state.monitor = Monitor(gateway.audit)
    return monitor


MonitorDep = Annotated[Monitor, Depends(_monitor)]
_RULE_PATTERN = "^(" + "|".join(RULES) + ")$"


@router.get("/alerts")
def alerts(
    principal: CurrentPrincipal,
    gateway: GatewayDep,
    monitor: MonitorDep,
    rule: Annotated[str | None, Query(pattern=_RULE_PATTERN)] = None,
    after_index: Annotated[int | None, Query(ge=-1)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_ALERTS_LIMIT)] = 100,
) -> Json:
    """Alerts raised by the rules over the audit log (``docs/alerts.md``), oldest first; each
    names the audit entries behind it. Poll with ``after_index`` = the last alert's
    ``last_index``."""
    return audited_json(list_alerts(gateway, monitor, principal, rule, after_index, limit))


# Served documents may hold org names, purposes and reasons that are not ours: nothing in
# them may run, load or be sniffed into something else.
_DOCUMENT_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'",
    "X-Content-Type-Options": "nosniff",
}


@router.get("/report", response_model=None)
def report(
    principal: CurrentPrincipal,
    gateway: GatewayDep,
    since: Annotated[str | None, Query(max_length=40)] = None,
    until: Annotated[str | None, Query(max_length=40)] = None,
    bucket: Annotated[Literal["day", "hour"], Query()] = "day",
    fmt: Annotated[ReportFormat, Query(alias="format")] = "json",
    kind: Annotated[Literal["access", "refusals", "persons"], Query()] = "access",
) -> Response:
    """Access over time, refusals by reason and per-person access over ``[since, until)``
    (``YYYY-MM-DD`` = local midnight, Asia/Shanghai): JSON (every table), CSV (the ``kind``
    table), SVG (the access chart) or HTML (chart and tables)."""
    result = audit_report(gateway, principal, since, until, bucket, kind, fmt)
    if fmt == "json":
        return audited_json(result)
    body: dict[str, Any] = result.body
    headers = {"Audit-Index": str(result.audit_id)}
    if fmt == "csv":
        stamp = (since or "start") + "_" + (until or "now")
        name = re.sub(r"[^0-9A-Za-z_.-]", "", f"audit-{kind}-{stamp}.csv")
        headers["Content-Disposition"] = f'attachment; filename="{name}"'
    else:
        headers.update(_DOCUMENT_HEADERS)
    return Response(body["content"], media_type=body["media_type"], headers=headers)
