"""FastAPI dependencies as ``Annotated`` aliases, all in one place.

Dependencies are ``async`` so they run on the event loop: a sync dependency costs a threadpool
hop per request, which is most of the gateway's fixed overhead on small queries.

The busiest routes (the person endpoints) are :class:`DirectRoute` s: their endpoint takes the
request alone, calls :func:`get_principal` and :func:`json_body` itself and returns its
response, and FastAPI calls it directly. FastAPI's dependency, body and response handling cost
about 0.09 ms of CPU a request there (measured), a tenth of such a check; routing, error
handlers and the OpenAPI document are FastAPI's as for any route (:func:`json_body_openapi`
documents the body as a body parameter would have).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Annotated, Any, TypeVar, cast

import orjson
from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.responses import Response

from gateway.auth.tokens import Principal
from gateway.errors import AuthenticationFailed
from gateway.service.gateway import Gateway

__all__ = ["CurrentPrincipal", "DirectRoute", "GatewayDep", "get_gateway", "get_principal",
           "json_body", "json_body_openapi"]

Model = TypeVar("Model", bound=BaseModel)


async def get_gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


GatewayDep = Annotated[Gateway, Depends(get_gateway)]


async def get_principal(request: Request, gateway: GatewayDep) -> Principal:
    """The bearer token's caller; a failure is audited (as anonymous) before the 401."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    try:
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthenticationFailed("missing bearer token")
        # Signature check only (no I/O): cheap enough for the event loop.
        principal = gateway.tokens.verify(token.strip())
    except AuthenticationFailed as exc:
        # Awaited on the event loop: a flood of bad tokens waits for durability without
        # taking a worker thread each.
        await gateway.record_async(
            None, f"auth:{request.method} {request.url.path}", status=401,
            decision="deny", error_code=exc.code, reasons=[exc.message],
        )
        raise
    request.state.principal = principal
    return principal


CurrentPrincipal = Annotated[Principal, Depends(get_principal)]


async def json_body(request: Request, model: type[Model]) -> Model:
    """The request's JSON body as ``model``; a body that is not JSON or does not validate is
    a :class:`RequestValidationError` (400 ``bad_request``, members named, values never
    echoed), as a FastAPI body parameter gives."""
    raw = await request.body()
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise RequestValidationError(
            [{"type": "json_invalid", "loc": ("body",), "msg": "JSON decode error"}]) from None
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**err, "loc": ("body", *err["loc"])} for err in exc.errors(include_input=False)]
        ) from None


def json_body_openapi(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` of a route that reads its body with :func:`json_body`."""
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": model.model_json_schema()}}}}


class DirectRoute(APIRoute):
    """A route whose endpoint is ``async (request) -> Response``, called as it is (FastAPI's
    own handler would resolve dependencies, read the body and serialize a return value)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        return cast(Callable[[Request], Coroutine[Any, Any, Response]], self.endpoint)
