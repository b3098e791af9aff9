"""Who may call the mutating HTTP endpoints (every POST, PUT, DELETE and PATCH route).

    peer address                           admin token set?   Authorization        answer
    loopback (127.0.0.0/8, ::1,            either             any or none          allowed
      ::ffff:127.x.x.x)
    any other                              no                 any or none          403
    any other                              yes                Bearer <the token>   allowed
    any other                              yes                missing or wrong     401

GET and HEAD stay open to everyone, except under ``/quota`` (its answers name
``cache_salt`` values, which are tenants' secrets): those follow the rule above too.
The rule is one ASGI middleware that looks only at the method (and that path), so a
route added later is covered without a line of its own. The peer address is
uvicorn's: the socket's peer, or the X-Forwarded-For of a proxy on 127.0.0.1 (uvicorn's
``forwarded_allow_ips`` default), so a proxy on this host does not make its clients
loopback. Tokens are compared in constant time; neither a token nor a header is logged.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
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
        if is_loopback(host):
            return None
        what = f"{scope['method']} {_shown_path(scope)}"
        if self._token is None:
            status, headers = 403, None
            reason = f"{what} is only allowed from loopback or with the admin token ({TOKEN_HINT})"
        elif bearer_matches(_header(scope, b"authorization"), self._token):
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
