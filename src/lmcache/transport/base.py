"""The client-side transport seam.

A `Transport` sends one request and returns its reply. `ZmqTransport` talks to
a server over TCP; `InProcessTransport` calls a `RequestHandler` directly, so
client and connector logic can be tested without sockets (like httpx's
MockTransport).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from lmcache.protocol.codec import decode_reply, decode_request, encode
from lmcache.protocol.messages import ErrorReply, Reply, Request

if TYPE_CHECKING:
    from lmcache.server.handlers import RequestHandler


Data = list[bytes] | list[memoryview]


class Transport(Protocol):
    def call(
        self, request: Request, timeout: float | None = None, data: Sequence[Any] = ()
    ) -> tuple[Reply, Data]:
        """Send ``request`` (and raw ``data`` frames); return the reply and its data frames."""

    def close(self) -> None: ...


class InProcessTransport:
    """Runs requests through the wire codec and a handler in this process."""

    def __init__(self, handler: RequestHandler) -> None:
        self._handler = handler

    def call(
        self, request: Request, timeout: float | None = None, data: Sequence[Any] = ()
    ) -> tuple[Reply, Data]:
        decoded = decode_request(encode(request))  # same validation as the wire
        if isinstance(decoded, ErrorReply):
            return decoded, []
        result = self._handler.dispatch(decoded, [memoryview(d) for d in data])
        outcome = result() if callable(result) else result
        reply, frames = outcome if isinstance(outcome, tuple) else (outcome, [])
        return decode_reply(encode(reply)), [bytes(f) for f in frames]

    def close(self) -> None:
        pass
