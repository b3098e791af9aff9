"""The composition root: builds every component from settings and runs the process.

    settings ─> L1 pool (POSIX shm) ─> L1Cache ─┐
                EngineRegistry ─────────────────┼─> RequestHandler ─> ZmqServer (port 5555)
                Sessions, Metrics ──────────────┘            │
                Maintenance thread (lock/session TTLs)       │
    FastAPI app (port 8080) ── health / status / clear / metrics

Start-up order, so that a failure costs nothing and leaves nothing behind: the HTTP
sockets are bound first (a taken port exits 1 before any memory is allocated); then
`ServerRuntime.start` runs in a thread beside uvicorn, so that ``/healthcheck`` answers
503 ("starting") while a large pool is being pre-faulted. uvicorn runs without a lifespan
and on the sockets bound here, so it never announces itself: the only success lines are
ours, "HTTP frontend on ..." and then "LMCache cache server is running...", logged after
the runtime started and never once a stop has begun.

`start` and `stop` exclude each other (one lock): a stop during start-up (SIGTERM while
the pool is pre-faulted) waits for the current step, and start then frees everything it
had allocated.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from types import FrameType
from typing import Any

import uvicorn

from lmcache import __version__
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
from lmcache.server.handlers import RequestHandler
from lmcache.server.metrics import Metrics
from lmcache.server.registry import EngineRegistry
from lmcache.server.sessions import Sessions
from lmcache.server.tiers import TieredStore, WriteBehind
from lmcache.server.worker_copy import PreparedTransfers
from lmcache.settings import ServerSettings
from lmcache.storage.chunk_store import ChunkStore
from lmcache.storage.eviction import make_policy
from lmcache.storage.keys import ChunkHasher
from lmcache.storage.keyspace import KeySpace
from lmcache.storage.l1 import L1Cache
from lmcache.storage.l2 import L2Adapter, make_adapter
from lmcache.storage.shm import ShmSegment, unlink_stale_segments
from lmcache.transport.peers import CurveServerKeys, local_socket_path
from lmcache.transport.zmq_server import ZmqServer

logger = logging.getLogger("lmcache.server")

POOL_PREFIX = "lmcache_l1_pool_"
KV_SEGMENT_PREFIX = "lmcache_kv_"  # engine workers' KV segments (see engine/shm_kv.py)
MAINTENANCE_PERIOD_S = 1.0
STOP_WAIT_S = 120.0  # how long stop() waits for a start-up step (a huge pool's pre-fault)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class StartAborted(Exception):
    """`ServerRuntime.stop` was called during `start`, which freed what it had allocated."""


class ServerRuntime:
    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.server_token = uuid.uuid4().hex
        self.started_at = time.time()
        self.ready = False
        self.startup_error: str | None = None
        self.maintenance_error: str | None = None
        self._segment: ShmSegment | None = None
        self._zmq: ZmqServer | None = None
        self._prepared: PreparedTransfers | None = None
        self._handler: RequestHandler | None = None
        self.tiers: TieredStore | None = None
        self._adapters: list[L2Adapter] = []
        self._stop = threading.Event()  # a stop was asked for: start() aborts, threads end
        self._lifecycle = threading.Lock()  # held by start() throughout; stop() waits for it
        self._stopped = False
        self._released = False
        self._maintenance = threading.Thread(
            target=self._maintain, name="lmcache-maintenance", daemon=True
        )
        self.l1: L1Cache | None = None
        self.registry = EngineRegistry(settings.chunk_size, settings.l1_size_bytes)
        self.sessions: Sessions | None = None
        self.metrics = Metrics(self._metric_state)

    # ----- life cycle ------------------------------------------------------------------

    def start(self) -> None:
        """Allocate and start everything. On failure, or when `stop` is called meanwhile
        (then `StartAborted`), free what was allocated and raise."""
        with self._lifecycle:
            try:
                self._check_abort()
                self._start_components()
                self._check_abort()
            except BaseException:
                self._release()
                raise
            self.ready = True

    def _check_abort(self) -> None:
        if self._stop.is_set():
            raise StartAborted("the server was asked to stop during start-up")

    def _start_components(self) -> None:
        s = self.settings
        logger.info(
            "torch_dev=StubCPUDevice(device_type=cpu), l1_size_gb=%g, eviction_policy=%s, "
            "chunk_size=%d, max_workers=%d",
            s.l1_size_gb, s.eviction_policy, s.chunk_size, s.max_workers,
        )  # fmt: skip
        for config in s.l2_adapter:  # a bad config fails before the pool is allocated
            self._adapters.append(make_adapter(config))
        local_path = local_socket_path(s.port)
        for prefix in (POOL_PREFIX, KV_SEGMENT_PREFIX):
            for name in unlink_stale_segments(prefix):
                logger.warning("Removed shared-memory segment /%s of a dead process", name)
        self._check_abort()
        # The pool's seal is its own random token, told only to local peers: it proves
        # that a worker found the right segment, and is never a credential.
        self._segment = ShmSegment.create(f"{POOL_PREFIX}{os.getpid()}", s.l1_size_bytes)
        self._check_abort()  # the pre-fault above is the long step
        self.l1 = L1Cache(self._segment.array, make_policy(s.eviction_policy))
        # L2's write-behind queue is the store's one hook: every chunk that becomes READY
        # from an engine (not from L2) is offered to it.
        write_behind = WriteBehind(s.l2_queue_size) if self._adapters else None
        store = ChunkStore(
            self.l1, on_stored=write_behind.offer if write_behind is not None else None
        )
        self.sessions = Sessions(store, s.chunk_size, s.lock_ttl_s)
        if write_behind is not None:
            self.tiers = TieredStore(
                store, self.sessions, self._adapters, write_behind,
                prefetch_workers=s.l2_prefetch_workers, breaker_s=s.l2_breaker_s,
            )  # fmt: skip
            self.tiers.start()
            for adapter in self._adapters:
                logger.info("L2 adapter %s", adapter.name)
        handler = RequestHandler(
            store=store,
            keys=KeySpace(ChunkHasher(s.chunk_size, s.hash_algorithm, s.hash_memo_bytes)),
            registry=self.registry,
            sessions=self.sessions,
            metrics=self.metrics,
            server_token=self.server_token,
            lock_ttl=s.lock_ttl_s,
            pool_name=self._segment.name,
            pool_seal=self._segment.token.hex(),
            local_endpoint=f"ipc://{local_path}",
            tiers=self.tiers,
        )
        self._prepared = handler.prepared
        self._handler = handler
        curve = CurveServerKeys.from_dir(s.curve_keys_dir) if s.curve_keys_dir else None
        zmq_server = ZmqServer(
            s.zmq_bind_endpoint, handler.dispatch, s.max_workers, local_path=local_path,
            curve=curve,
        )  # fmt: skip
        zmq_server.start()  # closes its sockets itself when it cannot bind
        self._zmq = zmq_server
        self._maintenance.start()
        logger.info("ZMQ server listening on %s and ipc://%s", s.zmq_bind_endpoint, local_path)
        if curve is not None:
            logger.info(
                "CurveZMQ on %s: %d authorized client keys in %s/authorized; clients need %s",
                s.zmq_bind_endpoint, len(curve.authorized), s.curve_keys_dir,
                os.path.join(s.curve_keys_dir or "", "server.key"),
            )  # fmt: skip
        elif not _is_loopback(s.host):
            logger.warning(
                "ZMQ listens on %s without --curve-keys-dir: network peers can only ping "
                "(they are not authenticated); see README, \"Threat model\"", s.zmq_bind_endpoint,
            )  # fmt: skip

    def request_stop(self) -> None:
        """Ask a running `start` to abort at its next step; never blocks (signal handlers)."""
        self._stop.set()

    def stop(self, wait_s: float = STOP_WAIT_S) -> None:
        """Idempotent. During start-up, waits for the current step and lets `start` abort;
        then frees everything (the pool is unlinked)."""
        self._stop.set()
        if not self._lifecycle.acquire(timeout=wait_s):
            logger.error(
                "start-up did not finish within %.0f s of the stop request: exiting without "
                "freeing what it allocated", wait_s,
            )  # fmt: skip
            return
        try:
            if self._stopped:
                return
            self._stopped = True
            self.ready = False
            self._release()
        finally:
            self._lifecycle.release()
        logger.info("LMCache cache server stopped")

    def announce(self, *lines: str) -> bool:
        """Log `lines` only while running: never once `stop` began (atomic with it)."""
        with self._lifecycle:
            if not self.ready or self._stop.is_set():
                return False
            for line in lines:
                logger.info("%s", line)
            return True

    def _release(self) -> None:
        """Free what `start` allocated, newest first; safe after a partial start, once."""
        if self._released:
            return
        self._released = True
        self._stop.set()
        if self._zmq is not None:
            self._zmq.stop()  # waits for running copies: nothing touches the pool after this
        if self._maintenance.is_alive():
            self._maintenance.join(timeout=10)
        if self.tiers is not None:
            self.tiers.stop()  # closes the adapters
        else:
            for adapter in self._adapters:
                adapter.close()
        self.registry.close()
        if self._segment is not None:
            self._segment.close()
            self._segment.unlink()
            self._segment = None

    def _maintain(self) -> None:
        while not self._stop.wait(MAINTENANCE_PERIOD_S):
            try:
                self.maintain_once()
            except Exception as exc:
                self.maintenance_error = f"{type(exc).__name__}: {exc}"
                logger.exception("maintenance failed")

    def maintain_once(self) -> None:
        assert self.l1 is not None and self.sessions is not None
        leases, writes = self.l1.expire()
        sessions = self.sessions.expire()
        if self._prepared is not None:
            self._prepared.expire()
        if leases or writes or sessions:
            logger.warning(
                "Expired %d locks, %d unfinished writes and %d sessions past their TTL",
                leases, writes, sessions,
            )  # fmt: skip
        if self._handler is not None:
            for line in self._handler.reap(self.settings.engine_timeout_s):
                logger.warning("%s", line)

    # ----- views for HTTP -----------------------------------------------------------------

    def health(self) -> list[str]:
        """Reasons the server is unhealthy (empty = healthy)."""
        if self.startup_error:
            return [f"startup failed: {self.startup_error}"]
        if not self.ready:
            return ["starting"]
        problems = []
        if self._zmq is None or not self._zmq.alive:
            problems.append(f"ZMQ loop is dead ({self._zmq.error if self._zmq else 'not started'})")
        if not self._maintenance.is_alive():
            problems.append("maintenance thread is dead")
        if self.maintenance_error:
            problems.append(f"maintenance failed: {self.maintenance_error}")
        if self.l1 is not None and self.l1.eviction_error:
            problems.append(f"eviction failed: {self.l1.eviction_error}")
        return problems

    def degraded(self) -> list[str]:
        """Parts that are down while the server still serves (an L2 adapter, say)."""
        return self.tiers.problems() if self.tiers is not None else []

    def clear_l2(self) -> int:
        removed = self.tiers.clear() if self.tiers is not None else 0
        logger.info("L2 cleared via HTTP API (%d objects)", removed)
        return removed

    def clear(self) -> int:
        if self.l1 is None:
            raise RuntimeError("server is not ready")
        removed = self.l1.clear()
        logger.info("Cache cleared via HTTP API (%d chunks)", removed)
        return removed

    def status(self) -> dict[str, Any]:
        zmq_server = self._zmq
        return {
            "version": __version__,
            "ready": self.ready,
            "healthy": not self.health(),
            "problems": self.health(),
            "server_token": self.server_token,  # an instance id, not a secret (no seal)
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started_at, 3),
            "zmq_endpoint": self.settings.zmq_bind_endpoint,
            "local_endpoint": self._zmq.local_endpoint if self._zmq else None,
            "l1": {
                **(self.l1.stats() if self.l1 else {}),
                "shm_segment": self._segment.name if self._segment else None,
            },
            "l2_adapters": self.tiers.status() if self.tiers else [],
            "workers": [
                {
                    "name": "zmq-loop",
                    "alive": bool(zmq_server and zmq_server.alive),
                    "error": zmq_server.error if zmq_server else None,
                },
                {
                    "name": "worker-pool",
                    "alive": bool(zmq_server and zmq_server.alive),
                    "max_workers": self.settings.max_workers,
                    "in_flight": zmq_server.in_flight if zmq_server else 0,
                },
                {
                    "name": "maintenance",
                    "alive": self._maintenance.is_alive(),
                    "error": self.maintenance_error,
                },
            ],
            "engines": [e.describe() for e in self.registry.engines()],
            "prepared_transfers": len(self._prepared) if self._prepared else 0,
            "sessions": {
                "active": len(self.sessions) if self.sessions else 0,
                "items": self.sessions.snapshot() if self.sessions else [],
            },
            "config": self.settings.redacted(),
        }

    def _metric_state(self) -> dict[str, Any]:
        empty = {"used_bytes": 0, "capacity_bytes": 0, "objects": 0, "locked": 0, "evictions": 0}
        return {
            "l1": self.l1.stats() if self.l1 else empty,
            "engines": len(self.registry.engines()),
            "sessions": len(self.sessions) if self.sessions else 0,
            "l2": self.tiers.status() if self.tiers else [],
        }


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
            create_app(runtime, metrics=runtime.metrics.registry, admin_token=_secret(settings)),
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


def _serve(runtime: ServerRuntime, server: _Server) -> int:
    settings = runtime.settings
    try:
        sockets = bind_http(settings.http_host, settings.http_port)
    except OSError as exc:
        logger.error("%s", exc)
        return 1
    host, port = settings.http_host, sockets[0].getsockname()[1]

    def start() -> None:
        try:
            runtime.start()
        except StartAborted:
            return
        except Exception as exc:
            runtime.startup_error = str(exc)
            logger.error("LMCache cache server failed to start: %s", exc)
            logger.debug("start-up failure", exc_info=True)
            server.should_exit = True
            return
        while not server.started and not server.should_exit:
            time.sleep(0.01)
        if server.started:
            runtime.announce(
                f"HTTP frontend on http://{host}:{port}", "LMCache cache server is running..."
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
    return 1 if runtime.startup_error else 0
