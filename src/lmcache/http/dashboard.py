"""The live dashboard at ``GET /``: one HTML page, a stylesheet and a script shipped inside
the package (``lmcache/http/static``, package data), so that ``pip install`` carries it and
nothing is built or fetched on the user's machine. The page polls ``/status`` every second
and draws what it reads; its one button (clear L1) posts to ``/clear-cache``, which the
admin rule (`lmcache.http.security`) guards like any other mutation, and the page shows the
refusal when it comes. No secret is on the page: it shows chosen fields of ``/status``,
which already masks them.

The files are read once, at app creation. Headers: a content security policy that allows
only this origin's script, style and fetches (no inline script, no third party), and no
framing (a framed page could trick a click on the clear button).
"""

from __future__ import annotations

from importlib import resources

from fastapi import FastAPI, HTTPException
from fastapi.responses import Response

_FILES = {  # name -> media type; the only files served
    "dashboard.html": "text/html; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
}
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # an upgraded server serves its own page at once
}


def load_static() -> dict[str, bytes]:
    """The dashboard's files from the installed package."""
    root = resources.files("lmcache.http").joinpath("static")
    return {name: root.joinpath(name).read_bytes() for name in _FILES}


def add_dashboard_routes(app: FastAPI) -> None:
    """``GET /`` (the page) and ``GET /dashboard/{name}`` (its stylesheet and script)."""
    files = load_static()

    def serve(name: str) -> Response:
        return Response(files[name], media_type=_FILES[name], headers=_HEADERS)

    @app.get("/", summary="The live dashboard (HTML)", response_class=Response)
    def dashboard() -> Response:
        return serve("dashboard.html")

    @app.get("/dashboard/{name}", include_in_schema=False)
    def dashboard_file(name: str) -> Response:
        if name not in _FILES or name == "dashboard.html":
            raise HTTPException(status_code=404)
        return serve(name)
