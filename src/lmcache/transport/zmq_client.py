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
import time
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
        self._rcvtimeo = -1  # the socket's current RCVTIMEO (ms), set only when it changes
        self._sock = self._connect()

    def _connect(self) -> zmq.Socket[bytes]:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 1000)
        sock.connect(self.endpoint)
        self._rcvtimeo = -1
        return sock

    def call(
        self, request: Request, timeout: float | None = None, data: Sequence[Any] = ()
    ) -> tuple[Reply, Data]:
        timeout = self.timeout if timeout is None else timeout
        payload = encode(request)
        with self._lock:
            sock = self._sock
            try:
                if data:
                    sock.send_multipart([payload, *data], zmq.NOBLOCK, copy=False)
                else:
                    sock.send(payload, zmq.NOBLOCK)  # small: a plain copy, no Frame object
            except zmq.Again:
                self._reset()
                raise ServerUnavailableError(f"cannot send to {self.endpoint}") from None
            # A blocking recv with RCVTIMEO waits like a poll but in one call (the GIL
            # is released inside); replies to earlier, timed-out calls are skipped.
            deadline = time.monotonic() + timeout
            wait_ms = int(timeout * 1000)  # the same every call: no setsockopt then
            while wait_ms > 0:
                if wait_ms != self._rcvtimeo:
                    sock.setsockopt(zmq.RCVTIMEO, wait_ms)
                    self._rcvtimeo = wait_ms
                try:
                    frame = sock.recv(copy=False)
                except zmq.Again:
                    break
                header = frame.bytes
                frames = []
                while frame.more:  # cheaper than getsockopt(RCVMORE)
                    frame = sock.recv(copy=False)  # data frames: zero-copy, may be large
                    frames.append(frame)
                try:
                    reply: Reply | None = decode_reply(header)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    reply = None  # not ours to understand; keep waiting for our reply
                if reply is not None and reply.id == request.id:
                    return reply, [memoryview(f.buffer) for f in frames]
                wait_ms = int((deadline - time.monotonic()) * 1000)
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
