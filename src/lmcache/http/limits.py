"""HTTP serving bounds that uvicorn lacks: sockets bound before anything is allocated,
a descriptor budget, and a protocol that caps connections and header time and size.

`lmcache.server.process.run_server` uses all of it; see `bounded_http_protocol`.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import os
import resource
import socket
import time
from typing import Any

from uvicorn.protocols.http.auto import AutoHTTPProtocol

logger = logging.getLogger("lmcache.server")

# HTTP bounds (see `bounded_http_protocol`); the connection limit is a setting.
HTTP_KEEP_ALIVE_S = 5  # an idle keep-alive connection is closed after this
HTTP_MAX_HEADER_BYTES = 64 * 1024  # request line + headers; our requests carry no body
FD_RESERVE = 512  # descriptors for everything but connections: files, pipes, libzmq


def bind_http(host: str, port: int, backlog: int = 2048) -> list[socket.socket]:
    """Bind and listen on every address of ``host:port`` now, before anything is allocated,
    so that a taken port fails start-up at once; uvicorn then serves these sockets.

    Raises OSError with a one-line message that names the address and the flag to change.
    """
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise OSError(f"cannot bind HTTP on {shown}: {exc.strerror} (check --http-host)") from None
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio does
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind((address[0], port, *address[2:]))
            except OSError as exc:
                # "localhost" may name ::1 in a container without IPv6: serve the others.
                if (
                    exc.errno == errno.EADDRNOTAVAIL
                    and family == socket.AF_INET6
                    and len(infos) > 1
                ):
                    sockets.pop().close()
                    continue
                raise
            sock.listen(backlog)
            port = sock.getsockname()[1]  # --http-port 0: every address on the same port
        if not sockets:
            raise OSError(errno.EADDRNOTAVAIL, os.strerror(errno.EADDRNOTAVAIL))
    except OSError as exc:
        for sock in sockets:
            sock.close()
        reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
        hint = "use --http-port" if exc.errno == errno.EADDRINUSE else "check --http-host"
        raise OSError(f"cannot bind HTTP on {shown}: {reason} ({hint})") from None
    return sockets


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the soft limit now in force.

    Every ZMQ peer and every HTTP connection holds a descriptor; the default soft limit
    (often 1024) is what "Too many open files" hit first.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:  # e.g. hard = unlimited, above fs.nr_open
            logger.debug("cannot raise RLIMIT_NOFILE to %s: %s", hard, exc)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    logger.debug("file descriptors: soft limit %s, hard limit %s", soft, hard)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def http_connection_limit(wanted: int, fd_limit: int) -> int:
    """`--http-max-connections`, lowered so that HTTP can hold at most about half of the
    descriptors (the rest stays for ZMQ peers and the server's own files)."""
    budget = max(1, (fd_limit - FD_RESERVE) // 2)
    if wanted > budget:
        logger.warning(
            "--http-max-connections %d lowered to %d: HTTP may hold at most half of the %d "
            "file descriptors (RLIMIT_NOFILE) less %d; the rest stays for ZMQ clients",
            wanted, budget, fd_limit, FD_RESERVE,
        )  # fmt: skip
        return budget
    return wanted


def bounded_http_protocol(max_connections: int, header_timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol (httptools, else h11) with the bounds uvicorn lacks.

    uvicorn's ``limit_concurrency`` answers 503 only once a request has been read, and it
    has no header timeout: a client that opens connections and never finishes a request
    holds a descriptor each, for ever. So, per server:

    - at most `max_connections` are open: to admit a new one, the connection that has
      waited longest for a request (half-open, or idle keep-alive) is closed; when every
      connection is busy with a request, uvicorn answers 503 (``limit_concurrency``);
    - a connection must deliver its request line and headers within `header_timeout_s`
      of connecting (or of its previous response), and in at most HTTP_MAX_HEADER_BYTES.

    Of uvicorn's protocols (the same in both) this uses `connection_made`, `data_received`,
    `on_response_complete`, `connection_lost`, `transport`, `client`, `connections` (the
    server's set) and `cycle.response_complete`; tests/test_lifecycle_failures.py covers it.
    """
    live: dict[Any, None] = {}  # open connections, not yet closed by us
    waiting: dict[Any, None] = {}  # connections waiting for a request, oldest first
    shed_count, shed_logged_at = 0, -math.inf

    class BoundedHTTPProtocol(AutoHTTPProtocol):  # type: ignore[misc,valid-type]
        _timer: asyncio.TimerHandle | None = None
        _header_bytes = 0

        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(transport)
            live[self] = None
            self._wait_for_request()
            if len(live) >= max_connections:
                self._shed_oldest_waiting()

        def data_received(self, data: bytes) -> None:
            if self._waiting():
                self._header_bytes += len(data)
                if self._header_bytes > HTTP_MAX_HEADER_BYTES:
                    self._close(f"request headers over {HTTP_MAX_HEADER_BYTES} bytes")
                    return
            super().data_received(data)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():  # kept alive: the next request may come
                self._wait_for_request()

        def connection_lost(self, exc: Exception | None) -> None:
            live.pop(self, None)
            waiting.pop(self, None)
            if self._timer is not None:
                self._timer.cancel()
            super().connection_lost(exc)

        def _waiting(self) -> bool:
            cycle = self.cycle
            return cycle is None or bool(cycle.response_complete)

        def _wait_for_request(self) -> None:
            waiting.pop(self, None)
            waiting[self] = None  # to the end: the newest waiter
            self._header_bytes = 0
            if self._timer is not None:
                self._timer.cancel()
            self._timer = asyncio.get_running_loop().call_later(
                header_timeout_s, self._header_timeout
            )

        def _header_timeout(self) -> None:
            if self._waiting():
                self._close(f"no request within {header_timeout_s:g} s")

        def _close(self, why: str) -> None:
            live.pop(self, None)
            waiting.pop(self, None)
            # Out of uvicorn's count now: its limit_concurrency check must not see it (with
            # uvloop, a new connection's request can be read before connection_lost runs).
            self.connections.discard(self)
            if not self.transport.is_closing():
                logger.debug("HTTP connection from %s closed: %s", self.client, why)
                self.transport.close()

        def _shed_oldest_waiting(self) -> None:
            nonlocal shed_count, shed_logged_at
            while waiting:
                oldest = next(iter(waiting))
                if oldest is self:  # nobody else waits: every other one is busy
                    return
                del waiting[oldest]  # a busy one comes back at its response
                if oldest._waiting() and not oldest.transport.is_closing():
                    oldest._close("connection limit reached")
                    shed_count += 1
                    if time.monotonic() - shed_logged_at >= 60:  # a warning a minute at most
                        logger.warning(
                            "HTTP: %d connections at --http-max-connections %d: closed %d "
                            "idle or half-open ones to admit new ones",
                            len(live), max_connections, shed_count,
                        )  # fmt: skip
                        shed_logged_at = time.monotonic()
                    return

    return BoundedHTTPProtocol
