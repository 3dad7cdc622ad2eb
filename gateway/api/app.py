"""The FastAPI application: wiring only. Build a :class:`Gateway` and hand it to the routes."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response

from gateway import __version__
from gateway.api.errors import install_error_handlers
from gateway.api.metrics import REQUEST_SECONDS, REQUESTS
from gateway.api.routes import health, oauth, v1
from gateway.service.gateway import Gateway

__all__ = ["create_app"]


def create_app(gateway: Gateway) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        gateway.audit.close()

    app = FastAPI(
        title="医保商保数据共享网关 (yibao-gateway)",
        version=__version__,
        description=(
            "Least-necessary, de-identified, audited access to 医保 data for commercial "
            "health insurers. Every call but health needs `Authorization: Bearer <token>`."
        ),
        lifespan=lifespan,
    )
    app.state.gateway = gateway
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(oauth.router)
    app.include_router(v1.router)

    @app.middleware("http")
    async def _metrics(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        name = getattr(route, "path", "unmatched")
        REQUESTS.labels(name, str(response.status_code)).inc()
        REQUEST_SECONDS.labels(name).observe(time.perf_counter() - started)
        response.headers["Cache-Control"] = response.headers.get("Cache-Control", "no-store")
        return response

    return app
