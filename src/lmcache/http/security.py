"""Who may call the mutating HTTP endpoints (every POST, PUT, DELETE and PATCH route).

    peer address                           admin token set?   Authorization        answer
    loopback (127.0.0.0/8, ::1,            either             any or none          allowed
      ::ffff:127.x.x.x)
    any other                              no                 any or none          403
    any other                              yes                Bearer <the token>   allowed
    any other                              yes                missing or wrong     401

Browsers are refused first, whatever the peer: a page on any site that a user on this host
opens could otherwise POST to ``http://localhost:8080/clear-cache`` as a loopback peer.

    Sec-Fetch-Site cross-site or same-site, or an Origin other than the Host   -> 403
    loopback peer without a valid token, Host not 127.x / ::1 / localhost /   -> 403
      this host's own name
      (a page that points its own name at 127.0.0.1: DNS rebinding)

Our own dashboard (same origin) and non-browser clients (curl, the CLI: no Origin) pass.

GET and HEAD stay open to everyone, except under ``/quota`` (its answers name
``cache_salt`` values, which are tenants' secrets): those follow the rule above too.
The rule is one ASGI middleware that looks only at the method (and that path), so a
route added later is covered without a line of its own. The peer address is
uvicorn's: the socket's peer, or the X-Forwarded-For of a proxy on 127.0.0.1 (uvicorn's
``forwarded_allow_ips`` default), so a proxy on this host does not make its clients
loopback. Tokens are compared in constant time; neither a token nor a header is logged.
"""

from __future__ import annotations

import contextlib
import functools
import hmac
import ipaddress
import logging
import socket
from typing import Any

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

logger = logging.getLogger("lmcache.http")

MUTATING_METHODS = frozenset({"POST", "PUT", "DELETE", "PATCH"})
ADMIN_READ_PREFIX = "/quota"  # GETs that reveal cache_salt values: admin like mutations
TOKEN_HINT = "--admin-token / LMCACHE_ADMIN_TOKEN"
MIN_TOKEN_CHARS = 16  # shorter ones work, with a warning at start
_SHOWN_PATH_CHARS = 200


def is_loopback(host: str | None) -> bool:
    """Whether `host` (an address as the ASGI server reports it) is loopback: 127.0.0.0/8,
    ::1, or an IPv4-mapped 127.x (``::ffff:127.0.0.1``). Names and None are not."""
    if not host:
        return False
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def bearer_matches(authorization: bytes | None, token: bytes) -> bool:
    """Whether an ``Authorization`` header value is ``Bearer <token>`` (constant time)."""
    if not authorization or not token:
        return False
    scheme, _, presented = authorization.strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return False
    return hmac.compare_digest(presented.strip(), token)


class AdminGuard:
    """ASGI middleware: mutating requests from non-loopback peers need the admin token."""

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app = app
        self._token = token.encode() if token else None  # an empty token is no token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and _admin_only(scope):
            refusal = self._refusal(scope)
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _refusal(self, scope: Scope) -> JSONResponse | None:
        client = scope.get("client")
        host = client[0] if client else None
        what = f"{scope['method']} {_shown_path(scope)}"
        browser = _cross_site(scope)
        if browser is None and is_loopback(host):
            if _local_host_header(scope) or self._token_matches(scope):
                return None
            browser = "its Host header is not a loopback name (DNS rebinding?)"
        if browser is not None:
            logger.warning("HTTP %s from %s refused (403): cross-site", what, host)
            reason = (
                f"{what} refused: {browser}. The admin endpoints take requests from this "
                "server's own pages and from non-browser clients only"
            )
            return JSONResponse({"status": "error", "reason": reason}, 403)
        if is_loopback(host):
            return None
        if self._token is None:
            status, headers = 403, None
            reason = f"{what} is only allowed from loopback or with the admin token ({TOKEN_HINT})"
        elif self._token_matches(scope):
            return None
        else:
            status, headers = 401, {"WWW-Authenticate": "Bearer"}
            reason = (
                f"{what} from a non-loopback address needs 'Authorization: Bearer <admin "
                f"token>' ({TOKEN_HINT}): the token is missing or wrong"
            )
        # Same template for every refusal: a flood of them is rate-limited by the log guard.
        logger.warning("HTTP %s from %s refused (%d)", what, host, status)
        return JSONResponse({"status": "error", "reason": reason}, status, headers=headers)

    def _token_matches(self, scope: Scope) -> bool:
        return self._token is not None and bearer_matches(
            _header(scope, b"authorization"), self._token
        )


_SAME_SITE_OK = frozenset({b"same-origin", b"none"})


def _cross_site(scope: Scope) -> str | None:
    """Why a request looks sent by a browser for another site's page; None if it does not."""
    fetch_site = _header(scope, b"sec-fetch-site")
    if fetch_site is not None and fetch_site.strip().lower() not in _SAME_SITE_OK:
        return (
            f"a browser sent it for a page of another site (Sec-Fetch-Site: {_shown(fetch_site)})"
        )
    origin = _header(scope, b"origin")
    if origin is None:
        return None
    _, _, origin_host = origin.strip().partition(b"://")
    if origin_host.lower() != (_header(scope, b"host") or b"").strip().lower():
        return f"its Origin ({_shown(origin)}) is not this server"
    return None


def _local_host_header(scope: Scope) -> bool:
    """Whether the Host header names this host by a loopback address or ``localhost`` (no
    Host: an HTTP/1.0 client, not a browser)."""
    raw = _header(scope, b"host")
    if raw is None:
        return True
    text = raw.decode("latin-1").strip().lower()
    name = text.rsplit(":", 1)[0] if not text.endswith("]") else text
    if text.startswith("[") and "]" in text:
        name = text[1 : text.index("]")]
    return name in _local_names() or is_loopback(name)


@functools.cache
def _local_names() -> frozenset[str]:
    """Names of this host itself: a rebinding page sends its own domain, never these (and
    Debian maps the host name to 127.0.1.1, so ``curl http://$(hostname):8080`` is local)."""
    names = {"localhost", "localhost.", socket.gethostname().lower()}
    with contextlib.suppress(OSError):
        names.add(socket.getfqdn().lower())
    return frozenset(names)


def _shown(value: bytes) -> str:
    text = value.decode("latin-1")[:_SHOWN_PATH_CHARS]
    return "".join(c if c.isprintable() else "?" for c in text)


def _admin_only(scope: Scope) -> bool:
    if scope["method"].upper() in MUTATING_METHODS:
        return True
    path = str(scope.get("path", ""))
    return path == ADMIN_READ_PREFIX or path.startswith(ADMIN_READ_PREFIX + "/")


def _header(scope: Scope, name: bytes) -> bytes | None:
    headers: list[tuple[bytes, bytes]] = scope.get("headers", [])
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


def _shown_path(scope: Scope) -> str:
    """The request path, shortened and with control characters escaped (it goes to the log)."""
    path: Any = scope.get("path", "")
    text = str(path)[: _SHOWN_PATH_CHARS + 1]
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= _SHOWN_PATH_CHARS else text[:_SHOWN_PATH_CHARS] + "..."
