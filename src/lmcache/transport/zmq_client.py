"""A synchronous, thread-safe ZMQ DEALER transport.

One call at a time per transport (a lock serialises callers): lookups and
stores are single round trips, so a direct send/recv is the lowest latency a
Python client can get. Use one transport per thread for concurrency.

On a timeout the socket is replaced, so a late reply can never be taken for the
answer to a later request; replies whose id does not match are dropped.

`local_endpoint_usable` decides whether a server's Unix-socket endpoint (where the
server learns our uid from the kernel) may be used: only a socket file of our own
uid, so that nobody else can stand in for the server there.
"""

from __future__ import annotations

import itertools
import os
import socket
import stat
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import zmq

from lmcache.defaults import RPC_TIMEOUT_S
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


_LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]", "::1")


def local_endpoint_for(endpoint: str) -> str:
    """The Unix-socket endpoint a server on ``tcp://<loopback>:<port>`` of this host binds
    (``ipc://<shm dir>/lmcache_zmq_<port>.sock``), or "" for any other endpoint."""
    scheme, _, rest = endpoint.partition("://")
    host, _, port = rest.rpartition(":")
    if scheme != "tcp" or not port.isdigit() or host not in _LOOPBACK_HOSTS:
        return ""
    from lmcache.transport.peers import local_socket_path

    return f"ipc://{local_socket_path(int(port))}"


def local_endpoint_usable(endpoint: str) -> bool:
    """``ipc://path`` names a socket file that this uid owns (so the server made it)."""
    if not endpoint.startswith("ipc://"):
        return False
    try:
        st = os.stat(endpoint.removeprefix("ipc://"))
    except OSError:
        return False
    return stat.S_ISSOCK(st.st_mode) and st.st_uid == os.getuid()


def refuses_connections(endpoint: str, timeout: float = 1.0) -> bool:
    """Whether nothing listens at ``endpoint``: the kernel refuses a plain connect at once.

    ZMQ itself never says so (it retries in the background until a reply times out), so
    a client that wants to fail fast on an absent server asks the kernel first. Any other
    outcome (accepted, a timeout, an unknown host) is "not refused": the real call decides.
    """
    scheme, _, rest = endpoint.partition("://")
    try:
        if scheme == "ipc":
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(timeout)
                sock.connect(rest)
        elif scheme == "tcp":
            host, _, port = rest.rpartition(":")
            host = host.removeprefix("[").removesuffix("]")
            if host == "*" or not port.isdigit():
                return False
            socket.create_connection((host, int(port)), timeout=timeout).close()
        else:
            return False
    except (ConnectionRefusedError, FileNotFoundError):
        return True
    except OSError:
        return False
    return False


@dataclass(frozen=True)
class CurveClientKeys:
    """CurveZMQ keys of a client on another host: the server's public key, our key pair (Z85)."""

    server_public: bytes
    public: bytes
    secret: bytes

    @classmethod
    def from_files(cls, server_key: str, client_cert: str) -> CurveClientKeys:
        """``server_key``: the server's ``server.key`` file (or its Z85 public key itself);
        ``client_cert``: our ``*.key_secret`` file (from `zmq.auth.create_certificates`)."""
        import zmq.auth

        if len(server_key) == 40 and not Path(server_key).exists():
            server_public = server_key.encode()
        else:
            server_public, _ = zmq.auth.load_certificate(server_key)
        public, secret = zmq.auth.load_certificate(client_cert)
        if secret is None:
            raise ValueError(f"{client_cert} holds no secret key (use the .key_secret file)")
        return cls(server_public, public, secret)


class ZmqTransport:
    def __init__(
        self, endpoint: str, timeout: float = RPC_TIMEOUT_S, curve: CurveClientKeys | None = None
    ) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self.curve = curve if endpoint.startswith("tcp://") else None
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._lock = threading.Lock()
        self._rcvtimeo = -1  # the socket's current RCVTIMEO (ms), set only when it changes
        self._closed = False
        self._sock = self._connect()

    def _connect(self) -> zmq.Socket[bytes]:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 1000)
        if self.curve is not None:
            sock.setsockopt(zmq.CURVE_SERVERKEY, self.curve.server_public)
            sock.setsockopt(zmq.CURVE_PUBLICKEY, self.curve.public)
            sock.setsockopt(zmq.CURVE_SECRETKEY, self.curve.secret)
        sock.connect(self.endpoint)
        self._rcvtimeo = -1
        return sock

    def call(
        self, request: Request, timeout: float | None = None, data: Sequence[Any] = ()
    ) -> tuple[Reply, Data]:
        timeout = self.timeout if timeout is None else timeout
        payload = encode(request)
        with self._lock:
            if self._closed:
                raise ServerUnavailableError(f"the transport to {self.endpoint} is closed")
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
            self._closed = True
            self._sock.close(linger=0)


_ids = itertools.count(1)


def next_request_id() -> int:
    """Request ids unique within this process (shared by every client)."""
    return next(_ids)
