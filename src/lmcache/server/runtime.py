"""The server's life inside the process: allocate the L1 pool, wire the parts over it
(`lmcache.server.build`), start the L2 writer, the ZMQ server and the maintenance thread,
and free everything at stop. What HTTP reads of it (`lmcache.http.app.ServerView`) is
`lmcache.server.views`; the process around it (signals, uvicorn, start-up order, exit
codes) is `lmcache.server.process`.

    settings ─> L2 adapters ─> stale segments removed ─> L1 pool (POSIX shm, pre-faulted)
             ─> build(settings, pool) ─> RequestHandler ─> ZmqServer (tcp + local endpoint)
             ─> maintenance thread (lock/session TTLs, dead engines)

`start` and `stop` exclude each other (one lock): a stop during start-up (SIGTERM while
the pool is pre-faulted) waits for the current step, and start then frees everything it
had allocated.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
import time
import uuid

from lmcache.server.build import build
from lmcache.server.l1_pool import PoolMemory
from lmcache.server.metrics import Metrics
from lmcache.server.quotas import QuotaTable
from lmcache.server.registry import EngineRegistry
from lmcache.server.views import RuntimeViews
from lmcache.server.watermark import WatermarkEvictor
from lmcache.settings import ServerSettings
from lmcache.storage.l1 import L1Cache
from lmcache.storage.l2 import L2Adapter, make_adapter
from lmcache.storage.shm_names import unlink_stale_segments
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


class ServerRuntime(RuntimeViews):
    def __init__(self, settings: ServerSettings) -> None:
        """Nothing allocated or started yet (`start`); the parts it makes are declared, and
        None until then, in `RuntimeViews`."""
        self.settings = settings
        self.server_token = uuid.uuid4().hex
        self.instance_id = settings.instance_id or str(uuid.uuid4())  # upstream's default
        self.started_at = time.time()
        self.ready = False
        self._adapters: list[L2Adapter] = []
        self._stop = threading.Event()  # a stop was asked for: start() aborts, threads end
        self._lifecycle = threading.Lock()  # held by start() throughout; stop() waits for it
        self._stopped = False
        self._released = False
        self._maintenance = threading.Thread(
            target=self._maintain, name="lmcache-maintenance", daemon=True
        )
        self.registry = EngineRegistry(
            settings.chunk_size, settings.l1_size_bytes, settings.copy_threads
        )
        self.metrics = Metrics(
            self._metric_state, names=settings.metrics_names, instance_id=self.instance_id
        )

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
        logger.info("instance_id=%s", self.instance_id)
        for config in s.l2_adapter:  # a bad config fails before the pool is allocated
            self._adapters.append(make_adapter(config))
        local_path = local_socket_path(s.port)
        for prefix in (POOL_PREFIX, KV_SEGMENT_PREFIX):
            for name in unlink_stale_segments(prefix):
                logger.warning("Removed shared-memory segment /%s of a dead process", name)
        self._check_abort()
        # The pool's seal is its own random token, told only to local peers: it proves
        # that a worker found the right segment, and is never a credential.
        pool = PoolMemory.create(
            f"{POOL_PREFIX}{os.getpid()}", s.l1_size_bytes, s.l1_init_size_bytes
        )
        self._segment = pool.segment
        self._check_abort()  # the pre-fault above is the long step
        core = build(
            s, self._segment.array, registry=self.registry, metrics=self.metrics,
            pool_committed=pool.reserved if pool.lazy else None,
            grow_pool=pool.grow if pool.lazy else None,
            adapters=self._adapters, server_token=self.server_token,
            pool_name=self._segment.name, pool_seal=self._segment.token.hex(),
            local_endpoint=f"ipc://{local_path}",
        )  # fmt: skip
        self.l1, self.sessions, self.tiers, handler = (
            core.l1,
            core.sessions,
            core.tiers,
            core.handler,
        )
        if self.tiers is not None:
            self.tiers.start()
            for adapter in self._adapters:
                logger.info("L2 adapter %s", adapter.name)
        self._prepared = handler.prepared
        self._handler = handler
        self._quotas = QuotaTable(core.l1)
        self._start_eviction(core.l1)
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

    def _start_eviction(self, l1: L1Cache) -> None:
        s = self.settings
        if s.eviction_policy == "IsolatedLRU" and s.default_quota_gb is None:
            logger.warning(
                "IsolatedLRU: a cache_salt without a quota may hold 0 bytes, so its stores are "
                "skipped until PUT /quota/{cache_salt} (or --default-quota-gb) gives it room"
            )
        if s.eviction_trigger_watermark is None:
            return
        if s.eviction_policy == "noop":
            logger.warning("--eviction-trigger-watermark has no effect with the noop policy")
        self.evictor = WatermarkEvictor(
            l1, s.eviction_trigger_watermark, s.eviction_ratio, s.eviction_interval_s
        )
        self.evictor.start()

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
        if self._handler is not None:  # engines that died with (or just before) us
            for line in self._handler.reaper.sweep_at_exit():
                logger.warning("%s", line)
        if self.evictor is not None:
            self.evictor.stop()
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
            if self._handler.kv_events is not None:
                self._handler.kv_events.sweep()  # removals from L1, whatever their cause
