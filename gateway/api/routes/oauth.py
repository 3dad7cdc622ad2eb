"""``POST /v1/oauth/token``: client credentials with a signed client assertion (RFC 7523)."""

from __future__ import annotations

from urllib.parse import parse_qs

from fastapi import APIRouter, Request

from gateway.api.deps import GatewayDep
from gateway.api.responses import Json
from gateway.errors import AuthenticationFailed, BadRequest

router = APIRouter(tags=["oauth"])

_FIELDS = ("grant_type", "client_assertion_type", "client_assertion")


@router.post(
    "/v1/oauth/token",
    openapi_extra={
        "requestBody": {
            "content": {
                "application/x-www-form-urlencoded": {
                    "schema": {
                        "type": "object",
                        "required": list(_FIELDS),
                        "properties": {f: {"type": "string"} for f in _FIELDS},
                    }
                }
            }
        }
    },
)
async def token(request: Request, gateway: GatewayDep) -> Json:
    if not request.headers.get("content-type", "").startswith(
        "application/x-www-form-urlencoded"
    ):
        raise BadRequest("the token endpoint takes application/x-www-form-urlencoded")
    raw = await request.body()
    if len(raw) > 16_384:
        raise BadRequest("request too large")
    try:
        form = parse_qs(raw.decode("ascii"), strict_parsing=True, max_num_fields=8)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadRequest("malformed form body") from exc
    if any(len(v) != 1 for v in form.values()):
        raise BadRequest("a form member is repeated")
    values = {k: v[0] for k, v in form.items()}
    missing = [f for f in _FIELDS if f not in values]
    if missing:
        raise BadRequest(f"missing form members: {', '.join(missing)}")

    def exchange() -> tuple[dict[str, object], int]:
        try:
            result = gateway.tokens.exchange(
                grant_type=values["grant_type"],
                assertion_type=values["client_assertion_type"],
                assertion=values["client_assertion"],
            )
        except AuthenticationFailed as exc:
            gateway.record(None, "oauth.token", status=401, decision="deny",
                           error_code=exc.code, reasons=[exc.message])
            raise
        principal = gateway.tokens.verify(str(result["access_token"]))
        return result, gateway.record(principal, "oauth.token", status=200, decision="allow")

    from starlette.concurrency import run_in_threadpool

    result, audit_id = await run_in_threadpool(exchange)
    return Json(result, headers={"Cache-Control": "no-store", "Pragma": "no-cache",
                                 "Audit-Index": str(audit_id)})
