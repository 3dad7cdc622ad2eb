"""FastAPI dependencies as ``Annotated`` aliases, all in one place.

Dependencies are ``async`` so they run on the event loop: a sync dependency costs a threadpool
hop per request, which is most of the gateway's fixed overhead on small queries.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from gateway.auth.tokens import Principal
from gateway.errors import AuthenticationFailed
from gateway.service.gateway import Gateway

__all__ = ["CurrentPrincipal", "GatewayDep", "get_gateway", "get_principal"]


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
