"""HTTP endpoints: health, status, clear and Prometheus metrics. OpenAPI at /docs.

Every mutating route (POST, PUT, DELETE, PATCH) is loopback-only unless the caller
presents the admin token: `lmcache.http.security.AdminGuard`, applied to the whole app.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from lmcache import __version__
from lmcache.http.security import MIN_TOKEN_CHARS, AdminGuard

if TYPE_CHECKING:
    from lmcache.server.runtime import ServerRuntime

logger = logging.getLogger("lmcache.http")


def create_app(runtime: ServerRuntime) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        on_startup: Callable[[], None] | None = getattr(app.state, "on_startup", None)
        if on_startup is not None:
            on_startup()
        yield
        on_shutdown: Callable[[], None] | None = getattr(app.state, "on_shutdown", None)
        if on_shutdown is not None:
            on_shutdown()

    app = FastAPI(title="LMCache server", version=__version__, lifespan=lifespan)
    secret = runtime.settings.admin_token
    token = secret.get_secret_value() if secret is not None else None
    if token and len(token) < MIN_TOKEN_CHARS:
        logger.warning(
            "--admin-token is shorter than %d characters: easy to guess over the network "
            "(e.g. `openssl rand -hex 32`)", MIN_TOKEN_CHARS,
        )  # fmt: skip
    app.add_middleware(AdminGuard, token=token)

    # HEAD answers like GET (uvicorn sends no body); a route of its own, out of the
    # OpenAPI schema, because one route with both methods gives a duplicate operation id.
    @app.api_route("/healthcheck", methods=["HEAD"], include_in_schema=False)
    @app.get("/healthcheck", summary="200 when serving, 503 with the reasons otherwise")
    def healthcheck() -> JSONResponse:
        problems = runtime.health()
        if problems:
            return JSONResponse({"status": "unhealthy", "reasons": problems}, status_code=503)
        degraded = runtime.degraded()  # e.g. an L2 adapter is down: still serving from L1
        if degraded:
            return JSONResponse({"status": "healthy", "degraded": degraded})
        return JSONResponse({"status": "healthy"})

    @app.post("/clear-cache", summary="Force-clear all L1 data, locked objects included")
    def clear_cache() -> JSONResponse:
        if not runtime.ready:
            return JSONResponse({"status": "error", "reason": "not ready"}, status_code=503)
        removed = runtime.clear()
        return JSONResponse({"status": "ok", "removed": removed})

    @app.post("/clear-l2", summary="Remove every object from every L2 adapter")
    def clear_l2() -> JSONResponse:
        if not runtime.ready:
            return JSONResponse({"status": "error", "reason": "not ready"}, status_code=503)
        return JSONResponse({"status": "ok", "removed": runtime.clear_l2()})

    @app.get("/status", summary="Detailed state of every component")
    def status() -> dict[str, Any]:
        return runtime.status()

    @app.get("/metrics", summary="Prometheus metrics")
    def metrics() -> Response:
        return Response(generate_latest(runtime.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
