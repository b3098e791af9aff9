"""The client-side transport seam.

A `Transport` sends one request and returns its reply. `ZmqTransport` is the one the
package uses; `MockTransport` answers from a function (like httpx's MockTransport), so
code above the transport (the client, the connector) can be tested without a server.
Every transport keeps one contract (tests/test_transport_contract.py): the reply to a
request carries its id, data frames pass both ways byte for byte, a server that stays
silent is a `ServerUnavailableError`, and so is a call on a closed transport.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from lmcache.errors import ServerUnavailableError
from lmcache.protocol.codec import decode_reply, decode_request, encode
from lmcache.protocol.messages import ErrorReply, Reply, Request

Data = list[bytes] | list[memoryview]


class Transport(Protocol):
    def call(
        self, request: Request, timeout: float | None = None, data: Sequence[Any] = ()
    ) -> tuple[Reply, Data]:
        """Send ``request`` (and raw ``data`` frames); return the reply and its data frames."""

    def close(self) -> None: ...


# What a mock server answers: a reply, a reply with data frames, or None (silence).
MockHandler = Callable[[Request, list[bytes]], "Reply | tuple[Reply, list[bytes]] | None"]


class MockTransport:
    """A `Transport` whose replies come from ``handler(request, data)``.

    Messages go through the wire codec both ways, so the handler sees exactly what a
    server would decode (an undecodable request becomes the server's `ErrorReply`), and
    the caller gets exactly what a client would. ``None`` from the handler is a server
    that stays silent: `ServerUnavailableError`, as a timeout would be.
    """

    endpoint = "mock://"

    def __init__(self, handler: MockHandler) -> None:
        self.handler = handler
        self.closed = False

    def call(
        self, request: Request, timeout: float | None = None, data: Sequence[Any] = ()
    ) -> tuple[Reply, Data]:
        if self.closed:
            raise ServerUnavailableError("the transport is closed")
        decoded = decode_request(encode(request))
        if isinstance(decoded, ErrorReply):
            return decoded, []
        outcome = self.handler(decoded, [bytes(d) for d in data])
        if outcome is None:
            raise ServerUnavailableError(f"no reply from {self.endpoint} (the handler is silent)")
        reply, frames = outcome if isinstance(outcome, tuple) else (outcome, [])
        return decode_reply(encode(reply)), [memoryview(bytes(f)) for f in frames]

    def close(self) -> None:
        self.closed = True
