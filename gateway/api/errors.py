"""The one place where errors become HTTP: ``{"error": {"code", "message", ...}}``.

Nothing else in the API formats an error. Unexpected exceptions become a bare 500 with no
detail (the traceback goes to the server log, which never holds request data).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.api.responses import Json
from gateway.errors import AuthenticationFailed, GatewayError, RateLimited

__all__ = ["error_response", "install_error_handlers"]

log = logging.getLogger("gateway.api")


def error_response(exc: GatewayError) -> Json:
    headers = {}
    if isinstance(exc, AuthenticationFailed):
        headers["WWW-Authenticate"] = f'Bearer error="{exc.code}"'
    if isinstance(exc, RateLimited) and exc.retry_after_s is not None:
        headers["Retry-After"] = str(exc.retry_after_s)
    audit_id = exc.details.get("audit_id")
    if audit_id is not None:
        headers["Audit-Index"] = str(audit_id)
    return Json(exc.to_json(), status_code=exc.status, headers=headers)


def _validation_message(exc: RequestValidationError) -> str:
    # Name the members, never echo the values.
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{loc or 'body'}: {err.get('type', 'invalid')}")
    return "invalid request: " + "; ".join(parts)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(GatewayError)
    async def _gateway_error(_: Request, exc: GatewayError) -> Json:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> Json:
        body = {"error": {"code": "bad_request", "message": _validation_message(exc)}}
        return Json(body, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> Json:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = {404: "no such endpoint", 405: "method not allowed"}.get(
            exc.status_code, "request failed"
        )
        return Json({"error": {"code": code, "message": message}},
                              status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> Json:
        log.error("unexpected error: %s", type(exc).__name__)
        return Json(
            {"error": {"code": "internal_error", "message": "internal error"}}, status_code=500
        )
