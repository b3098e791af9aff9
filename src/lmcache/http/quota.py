"""Upstream's ``/quota`` routes: per-``cache_salt`` byte budgets of IsolatedLRU.

    GET    /quota                  every quota (and the default for salts without one)
    GET    /quota/{cache_salt}     one quota (404: none; the default applies)
    PUT    /quota/{cache_salt}     {"limit_gb": float >= 0}: set it (evicts any excess now)
    DELETE /quota/{cache_salt}     remove it (the default applies; evicts any excess now)

``_default`` names the empty salt (requests without one), as upstream. A malformed body
is 422, a salt longer than the protocol allows 400, a policy other than IsolatedLRU or a
full table 409. All four are admin routes (`AdminGuard`): PUT and DELETE as every
mutating route, and the GETs too, since they list salts, which are tenants' secrets.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from lmcache.errors import QuotaError

MAX_SALT_CHARS = 256  # as a request's cache_salt (lmcache.server.registry.MAX_SALT_LEN)
MAX_LIMIT_GB = float(1 << 20)  # a PiB: anything above is a typo


class QuotaTableView(Protocol):
    """What the routes ask (lmcache.server.quotas.QuotaTable); a refusal is a
    `QuotaError` (its HTTP status and reason)."""

    def list(self) -> dict[str, Any]: ...
    def get(self, name: str) -> dict[str, Any]: ...
    def set(self, name: str, limit_gb: float) -> dict[str, Any]: ...
    def delete(self, name: str) -> dict[str, Any]: ...


class QuotaBody(BaseModel):
    limit_gb: float = Field(ge=0, le=MAX_LIMIT_GB, allow_inf_nan=False)


def _error(status: int, reason: str) -> JSONResponse:
    return JSONResponse({"status": "error", "reason": reason}, status_code=status)


def add_quota_routes(app: FastAPI, table: Callable[[], QuotaTableView | None]) -> None:
    """``table()`` is None until the server is ready (503)."""

    def serve(name: str | None, action: Callable[[QuotaTableView], dict[str, Any]]) -> JSONResponse:
        if name is not None and not 0 < len(name) <= MAX_SALT_CHARS:
            return _error(400, f"cache_salt: 1 to {MAX_SALT_CHARS} characters")
        current = table()
        if current is None:
            return _error(503, "not ready")
        try:
            return JSONResponse(action(current))
        except QuotaError as exc:
            return _error(exc.status, exc.reason)

    @app.get("/quota", summary="Per-cache_salt quotas (IsolatedLRU; admin)")
    def quotas() -> JSONResponse:
        return serve(None, lambda t: t.list())

    @app.get("/quota/{cache_salt}", summary="One cache_salt's quota (admin)")
    def quota(cache_salt: str) -> JSONResponse:
        return serve(cache_salt, lambda t: t.get(cache_salt))

    @app.put("/quota/{cache_salt}", summary="Set a cache_salt's quota in GiB (admin)")
    def set_quota(cache_salt: str, body: QuotaBody) -> JSONResponse:
        return serve(cache_salt, lambda t: {"status": "ok", **t.set(cache_salt, body.limit_gb)})

    @app.delete("/quota/{cache_salt}", summary="Remove a cache_salt's quota (admin)")
    def delete_quota(cache_salt: str) -> JSONResponse:
        return serve(cache_salt, lambda t: {"status": "ok", **t.delete(cache_salt)})
