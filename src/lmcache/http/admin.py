"""Upstream LMCache's MP HTTP routes, beside ours (README, "Upstream compatibility").

    POST   /cache/clear    {"tier": "l1"|"l2"|"all", "force": bool}, body optional
    GET    /cache/objects  ?tier=l1&page_size=1..5000&page_token=...   (L1 only)
    DELETE /cache/objects  {"keys": [hex, ...], "tier": "l1", "force": bool}
    GET    /config         the effective settings, secrets masked (as in /status)
    GET    /version        version, instance id, server token
    GET    /loglevel       ?logger_name=...              levels of lmcache's loggers
    POST   /loglevel       ?logger_name=...&level=DEBUG  (upstream sets it with GET too)

Mutating ones (POST, DELETE) pass `AdminGuard` like every other: loopback or the admin
token. Upstream changes a log level with a GET; here that GET only reads, and the change
is a POST, so that the guard covers it.
"""

from __future__ import annotations

import logging
from typing import Any, Literal, Protocol

from fastapi import Body, FastAPI, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from lmcache.types import ObjectKey

Tier = Literal["l1", "l2", "all"]
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
MAX_PAGE, DEFAULT_PAGE, MAX_DELETE = 5000, 500, 10_000
KEY_HEX = 96  # 16-byte namespace digest + 32-byte chunk hash


class CacheAdmin(Protocol):
    """What these routes ask of the server (the process runtime is one)."""

    ready: bool

    def clear_tiers(self, tier: Tier, force: bool) -> dict[str, int]: ...

    def list_l1(
        self, after: ObjectKey | None, limit: int
    ) -> tuple[list[dict[str, Any]], ObjectKey | None]: ...

    def delete_l1(self, keys: list[ObjectKey], force: bool) -> tuple[int, int]: ...

    def config(self) -> dict[str, Any]: ...

    def version_info(self) -> dict[str, Any]: ...


class ClearBody(BaseModel):
    tier: Tier = "l1"
    force: bool = False


class DeleteBody(BaseModel):
    keys: list[str] = Field(max_length=MAX_DELETE)
    tier: Tier = "l1"
    force: bool = False


def _error(status: int, reason: str) -> JSONResponse:
    return JSONResponse({"status": "error", "reason": reason}, status_code=status)


def _not_ready() -> JSONResponse:
    return _error(503, "not ready")


def _key(text: str) -> ObjectKey | None:
    if len(text) != KEY_HEX:
        return None
    try:
        return ObjectKey(bytes.fromhex(text))
    except ValueError:
        return None


_OPTIONAL_BODY = Body(None)  # upstream: an absent body means {"tier": "l1", "force": false}


def add_admin_routes(app: FastAPI, admin: CacheAdmin) -> None:
    @app.post("/cache/clear", summary="Clear a tier (upstream's body; force: locked too)")
    def cache_clear(body: ClearBody | None = _OPTIONAL_BODY) -> JSONResponse:
        body = body or ClearBody()
        if not admin.ready:
            return _not_ready()
        counts = admin.clear_tiers(body.tier, body.force)
        return JSONResponse({"status": "ok", "cleared": {"tier": body.tier, **counts}})

    @app.get("/cache/objects", summary="L1 objects in key order, a page at a time")
    def cache_objects(
        tier: Tier = "l1",
        page_size: int = Query(DEFAULT_PAGE, ge=1, le=MAX_PAGE),
        page_token: str | None = Query(None, max_length=KEY_HEX),
    ) -> JSONResponse:
        if tier != "l1":
            return _error(400, f"tier {tier!r}: only 'l1' can be listed here")
        after = None
        if page_token:
            after = _key(page_token)
            if after is None:
                return _error(400, "page_token: not a token from a previous page")
        if not admin.ready:
            return _not_ready()
        entries, last = admin.list_l1(after, page_size)
        return JSONResponse({
            "tier": "l1", "entries": entries,
            "next_page_token": last.hex() if last is not None else None,
        })  # fmt: skip

    @app.delete("/cache/objects", summary="Delete L1 objects by key (hex, from the listing)")
    def cache_objects_delete(body: DeleteBody) -> JSONResponse:
        if body.tier != "l1":
            return _error(400, f"tier {body.tier!r}: only 'l1' objects can be deleted by key")
        keys = [_key(k) for k in body.keys]
        bad = [i for i, k in enumerate(keys) if k is None]
        if bad:
            return _error(400, f"keys[{bad[0]}]: expected {KEY_HEX} hex digits")
        if not admin.ready:
            return _not_ready()
        deleted, skipped = admin.delete_l1([k for k in keys if k is not None], body.force)
        return JSONResponse({"ok": True, "deleted": deleted, "skipped": skipped})

    @app.get("/config", summary="Effective settings (secrets masked)")
    def config() -> dict[str, Any]:
        return admin.config()

    @app.get("/version", summary="Version and identity of this server")
    def version() -> dict[str, Any]:
        return admin.version_info()

    @app.get("/loglevel", summary="Levels of lmcache's loggers")
    def loglevel(logger_name: str | None = Query(None, max_length=200)) -> JSONResponse:
        if logger_name is not None:
            if not _ours(logger_name):
                return _error(404, f"logger_name: {logger_name!r} is not an lmcache logger")
            return JSONResponse({logger_name: _level(logger_name)})
        ours = sorted(n for n in logging.Logger.manager.loggerDict if n.startswith("lmcache."))
        names = ["lmcache", *ours]
        return JSONResponse({n: _level(n) for n in names[:1000]})

    @app.post("/loglevel", summary="Set the level of an lmcache logger")
    def set_loglevel(
        level: str = Query(..., max_length=20),
        logger_name: str = Query("lmcache", max_length=200),
    ) -> JSONResponse:
        if not _ours(logger_name):
            return _error(400, f"logger_name: {logger_name!r} is not an lmcache logger")
        if level.upper() not in LEVELS:
            return _error(400, f"level: {level!r} is not one of {', '.join(LEVELS)}")
        logging.getLogger(logger_name).setLevel(level.upper())
        logging.getLogger("lmcache.http").info("log level of %s set to %s", logger_name, level)
        return JSONResponse({logger_name: level.upper()})


def _ours(name: str) -> bool:
    # Only our loggers: the set is bounded, and nothing here creates a logger per request.
    return name == "lmcache" or (
        name.startswith("lmcache.") and name in logging.Logger.manager.loggerDict
    )


def _level(name: str) -> str:
    return logging.getLevelName(logging.getLogger(name).getEffectiveLevel())
