"""A synchronous, thread-safe ZMQ DEALER transport.

One call at a time per transport (a lock serialises callers): lookups and
stores are single round trips, so a direct send/recv is the lowest latency a
Python client can get. Use one transport per thread for concurrency.

On a timeout the socket is replaced, so a late reply can never be taken for the
answer to a later request; replies whose id does not match are dropped.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Sequence
from typing import Any

import msgspec
import zmq

from lmcache.errors import ServerUnavailableError
from lmcache.protocol.codec import decode_reply, encode
from lmcache.protocol.messages import Reply, Request
from lmcache.transport.base import Data


def normalize_endpoint(host: str, port: int) -> str:
    """Accept ``tcp://host``, ``host`` or ``10.0.0.1`` and return ``tcp://host:port``."""
    if "://" not in host:
        host = f"tcp://{host}"
    scheme, _, rest = host.partition("://")
    if scheme == "tcp" and rest.rsplit(":", 1)[-1].isdigit() and rest.count(":") == 1:
        return host  # already has a port
    return f"{scheme}://{rest}:{port}"


class ZmqTransport:
    def __init__(self, endpoint: str, timeout: float = 5.0) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._lock = threading.Lock()
        self._sock = self._connect()

    def _connect(self) -> zmq.Socket[bytes]:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 1000)
        sock.connect(self.endpoint)
        return sock

    def call(
        self, request: Request, timeout: float | None = None, data: Sequence[Any] = ()
    ) -> tuple[Reply, Data]:
        timeout = self.timeout if timeout is None else timeout
        with self._lock:
            try:
                self._sock.send_multipart([encode(request), *data], zmq.NOBLOCK, copy=False)
            except zmq.Again:
                self._reset()
                raise ServerUnavailableError(f"cannot send to {self.endpoint}") from None
            remaining_ms = int(timeout * 1000)
            while self._sock.poll(remaining_ms, zmq.POLLIN):
                frames = self._sock.recv_multipart(copy=False)
                try:
                    reply = decode_reply(frames[0].bytes)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    continue  # not ours to understand; keep waiting for our reply
                if reply.id == request.id:
                    return reply, [memoryview(f.buffer) for f in frames[1:]]
            self._reset()
        raise ServerUnavailableError(
            f"no reply from the LMCache server at {self.endpoint} within {timeout:g}s "
            "(is `lmcache server` running?)"
        )

    def _reset(self) -> None:
        self._sock.close(linger=0)
        self._sock = self._connect()

    def close(self) -> None:
        with self._lock:
            self._sock.close(linger=0)


_ids = itertools.count(1)


def next_request_id() -> int:
    """Request ids unique within this process (shared by every client)."""
    return next(_ids)
