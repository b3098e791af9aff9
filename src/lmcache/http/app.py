"""HTTP endpoints: health, status, clear, Prometheus metrics and the dashboard at ``/``
(`lmcache.http.dashboard`). OpenAPI at /docs.

Every mutating route (POST, PUT, DELETE, PATCH) is loopback-only unless the caller
presents the admin token: `lmcache.http.security.AdminGuard`, applied to the whole app.

The frontend knows the server only as a `ServerView` (what it reads and asks), so that
HTTP depends on nothing above it; the process runtime (`lmcache.server.runtime`) is one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from lmcache import __version__
from lmcache.http.admin import CacheAdmin, add_admin_routes
from lmcache.http.dashboard import add_dashboard_routes
from lmcache.http.quota import QuotaTableView, add_quota_routes
from lmcache.http.security import MIN_TOKEN_CHARS, AdminGuard

logger = logging.getLogger("lmcache.http")


class ServerView(Protocol):
    """What the HTTP frontend reads from, and asks of, the server."""

    ready: bool  # started and serving (mutations wait for it)

    def health(self) -> list[str]:
        """Why the server is unhealthy (empty: healthy)."""

    def degraded(self) -> list[str]:
        """Parts that are down while the server still serves (an L2 adapter, say)."""

    def clear(self) -> int:
        """Force-clear L1; returns the chunks removed."""

    def clear_l2(self) -> int:
        """Clear every L2 adapter; returns the objects removed."""

    def status(self) -> dict[str, Any]: ...


def create_app(
    server: ServerView,
    *,
    metrics: CollectorRegistry,
    admin_token: str | None = None,
    admin: CacheAdmin | None = None,
    serve_metrics: bool = True,
    quotas: Callable[[], QuotaTableView | None] | None = None,
) -> FastAPI:
    """The HTTP app over ``server``; ``metrics`` is served at /metrics (404 without
    ``serve_metrics``); ``admin`` adds upstream's routes (`lmcache.http.admin`), ``quotas``
    its /quota routes (`lmcache.http.quota`; None from it until the server is ready)."""
    app = FastAPI(title="LMCache server", version=__version__)
    token = admin_token
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
        problems = server.health()
        if problems:
            return JSONResponse({"status": "unhealthy", "reasons": problems}, status_code=503)
        degraded = server.degraded()  # e.g. an L2 adapter is down: still serving from L1
        if degraded:
            return JSONResponse({"status": "healthy", "degraded": degraded})
        return JSONResponse({"status": "healthy"})

    @app.post("/clear-cache", summary="Force-clear all L1 data, locked objects included")
    def clear_cache() -> JSONResponse:
        if not server.ready:
            return JSONResponse({"status": "error", "reason": "not ready"}, status_code=503)
        removed = server.clear()
        return JSONResponse({"status": "ok", "removed": removed})

    @app.post("/clear-l2", summary="Remove every object from every L2 adapter")
    def clear_l2() -> JSONResponse:
        if not server.ready:
            return JSONResponse({"status": "error", "reason": "not ready"}, status_code=503)
        return JSONResponse({"status": "ok", "removed": server.clear_l2()})

    @app.get("/status", summary="Detailed state of every component")
    def status() -> dict[str, Any]:
        return server.status()

    @app.get("/metrics", summary="Prometheus metrics")
    def prometheus_metrics() -> Response:
        if not serve_metrics:
            reason = "metrics are disabled (--disable-metrics / --disable-observability)"
            return JSONResponse({"status": "error", "reason": reason}, status_code=404)
        return Response(generate_latest(metrics), media_type=CONTENT_TYPE_LATEST)

    add_dashboard_routes(app)  # GET /: the live dashboard over /status
    if admin is not None:
        add_admin_routes(app, admin)
    if quotas is not None:
        add_quota_routes(app, quotas)
    return app
