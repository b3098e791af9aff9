"""The client-side transport seam.

A `Transport` sends one request and returns its reply. `ZmqTransport` talks to
a server over TCP; `InProcessTransport` calls a `RequestHandler` directly, so
client and connector logic can be tested without sockets (like httpx's
MockTransport).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from lmcache.protocol.codec import decode_reply, decode_request, encode
from lmcache.protocol.messages import ErrorReply, Reply, Request

if TYPE_CHECKING:
    from lmcache.server.handlers import RequestHandler


class Transport(Protocol):
    def call(self, request: Request, timeout: float | None = None) -> Reply: ...

    def close(self) -> None: ...


class InProcessTransport:
    """Runs requests through the wire codec and a handler in this process."""

    def __init__(self, handler: RequestHandler) -> None:
        self._handler = handler

    def call(self, request: Request, timeout: float | None = None) -> Reply:
        decoded = decode_request(encode(request))  # same validation as the wire
        if isinstance(decoded, ErrorReply):
            return decoded
        result = self._handler.dispatch(decoded)
        reply = result() if callable(result) else result
        return decode_reply(encode(reply))

    def close(self) -> None:
        pass
