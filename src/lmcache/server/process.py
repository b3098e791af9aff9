"""The server process: signals, the HTTP server, start-up order and exit codes.

Start-up order, so that a failure costs nothing and leaves nothing behind: the HTTP
sockets are bound first (a taken port exits 1 before any memory is allocated); then
`ServerRuntime.start` runs in a thread beside uvicorn, so that ``/healthcheck`` answers
503 ("starting") while a large pool is being pre-faulted. uvicorn runs without a lifespan
and on the sockets bound here, so it never announces itself: the only success lines are
ours, "HTTP frontend on ...", the start-up banner (`lmcache.server.banner`) and then
"LMCache cache server is running...", logged after
the runtime started and never once a stop has begun.

    lmcache server ─> run_server(settings) ─> signal handlers (whole run, start-up too)
                         ├─ bind HTTP sockets (taken port: exit 1, nothing allocated)
                         ├─ thread: ServerRuntime.start() ─> announce "... is running..."
                         └─ uvicorn on those sockets ... SIGTERM ─> runtime.stop() ─> exit 0
"""

from __future__ import annotations

import contextlib
import errno
import logging
import signal
import threading
import time
from collections.abc import Iterator
from types import FrameType
from wsgiref.simple_server import WSGIServer

import uvicorn
from prometheus_client import start_http_server

from lmcache.http.app import create_app
from lmcache.http.limits import (
    HTTP_KEEP_ALIVE_S,
    HTTP_MAX_HEADER_BYTES,
    bind_http,
    bounded_http_protocol,
    http_connection_limit,
    raise_fd_limit,
)
from lmcache.logs import setup_logging
from lmcache.server.banner import banner_lines
from lmcache.server.runtime import ServerRuntime, StartAborted
from lmcache.settings import ServerSettings

logger = logging.getLogger("lmcache.server")


def _secret(settings: ServerSettings) -> str | None:
    token = settings.admin_token
    return token.get_secret_value() if token is not None else None


class _Server(uvicorn.Server):
    """uvicorn, minus its own signal handling: `run_server` installs handlers for the whole
    run (start-up included), and a caught SIGTERM is not re-raised at exit: clean exit 0."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def run_server(settings: ServerSettings) -> int:
    """Run until SIGINT/SIGTERM. Exit status 0 after a clean stop (also when the signal came
    during start-up), 1 when start-up failed (a port taken, too little shared memory, a
    bad L2 adapter ...); invalid settings never get here (`lmcache.cli` exits 2)."""
    # Handlers first: from here on a signal stops the server cleanly, however early.
    runtime: ServerRuntime | None = None
    server: _Server | None = None
    caught: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        caught.append(signum)
        if runtime is not None:
            runtime.request_stop()  # a start-up in progress aborts at its next step
        if server is not None:
            server.handle_exit(signum, frame)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        setup_logging(settings.log_level)
        fd_limit = raise_fd_limit()
        max_connections = http_connection_limit(settings.http_max_connections, fd_limit)
        runtime = ServerRuntime(settings)
        config = uvicorn.Config(
            create_app(
                runtime,
                metrics=runtime.metrics.registry,
                admin_token=_secret(settings),
                admin=runtime,
                serve_metrics=settings.metrics_enabled,
                quotas=runtime.quota_table,
            ),
            host=settings.http_host,
            port=settings.http_port,
            log_config=None,
            access_log=False,
            lifespan="off",  # the runtime starts beside uvicorn: see the module docstring
            http=bounded_http_protocol(max_connections, settings.http_header_timeout_s),
            limit_concurrency=max_connections,
            timeout_keep_alive=HTTP_KEEP_ALIVE_S,
            h11_max_incomplete_event_size=HTTP_MAX_HEADER_BYTES,  # where uvicorn uses h11
        )
        server = _Server(config)
        if caught:  # a signal came before there was anything to tell
            runtime.request_stop()
            server.should_exit = True
        return _serve(runtime, server)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _prometheus_server(runtime: ServerRuntime) -> WSGIServer | None:
    """Upstream's --prometheus-port: /metrics also on a port of its own (as upstream,
    which serves it there only), bound to --http-host. None when not asked for."""
    s = runtime.settings
    if s.prometheus_port is None or not s.metrics_enabled:
        return None
    server, _ = start_http_server(s.prometheus_port, s.http_host, runtime.metrics.registry)
    logger.info("Prometheus metrics on http://%s:%d/metrics", s.http_host, s.prometheus_port)
    return server


def _serve(runtime: ServerRuntime, server: _Server) -> int:
    settings = runtime.settings
    try:
        sockets = bind_http(settings.http_host, settings.http_port)
    except OSError as exc:
        logger.error("%s", exc)
        return 1
    host, port = settings.http_host, sockets[0].getsockname()[1]
    try:
        prometheus = _prometheus_server(runtime)
    except OSError as exc:
        logger.error("--prometheus-port %s: %s", settings.prometheus_port, exc)
        for sock in sockets:
            sock.close()
        return 1

    def start() -> None:
        try:
            runtime.start()
        except StartAborted:
            return
        except Exception as exc:
            runtime.startup_error = str(exc)
            text = str(exc)
            if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
                text = (
                    f"{exc.strerror}; another process holds port {runtime.settings.port}: start "
                    "with --port N (and give engines lmcache.mp.port N)"
                )
            logger.error("LMCache cache server failed to start: %s", text)
            logger.debug("start-up failure", exc_info=True)
            server.should_exit = True
            return
        while not server.started and not server.should_exit:
            time.sleep(0.01)
        if server.started:
            runtime.announce(
                f"HTTP frontend on http://{host}:{port}",
                *banner_lines(settings, runtime.status(), port),
                "LMCache cache server is running...",
            )

    starter = threading.Thread(target=start, name="lmcache-startup", daemon=True)
    starter.start()
    try:
        server.run(sockets=sockets)
    finally:
        runtime.stop()  # waits for (and aborts) a start-up still running
        starter.join(timeout=10)
        for sock in sockets:
            sock.close()
        if prometheus is not None:
            prometheus.shutdown()
            prometheus.server_close()
    return 1 if runtime.startup_error else 0
