"""The server's life inside the process: allocate the L1 pool, wire the parts over it
(`lmcache.server.build`), start the L2 writer, the ZMQ server and the maintenance thread,
answer the HTTP views (`lmcache.http.app.ServerView`), and free everything at stop. The
process around it (signals, uvicorn, start-up order, exit codes) is `lmcache.server.process`.

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
from typing import Any

from lmcache import __version__
from lmcache.server.build import build
from lmcache.server.handlers import RequestHandler
from lmcache.server.l1_pool import PoolMemory
from lmcache.server.metrics import Metrics
from lmcache.server.quotas import QuotaTable
from lmcache.server.registry import EngineRegistry
from lmcache.server.sessions import Sessions
from lmcache.server.tiers import TieredStore
from lmcache.server.watermark import WatermarkEvictor
from lmcache.server.worker_copy import PreparedTransfers
from lmcache.settings import ServerSettings
from lmcache.storage import l1_admin
from lmcache.storage.l1 import L1Cache
from lmcache.storage.l2 import L2Adapter, make_adapter
from lmcache.storage.shm import ShmSegment
from lmcache.storage.shm_names import unlink_stale_segments
from lmcache.transport.peers import CurveServerKeys, local_socket_path
from lmcache.transport.zmq_server import ZmqServer
from lmcache.types import ObjectKey

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
        self.instance_id = settings.instance_id or str(uuid.uuid4())  # upstream's default
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
        self.evictor: WatermarkEvictor | None = None  # only with --eviction-trigger-watermark
        self._quotas: QuotaTable | None = None
        self.registry = EngineRegistry(
            settings.chunk_size, settings.l1_size_bytes, settings.copy_threads
        )
        self.sessions: Sessions | None = None
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

    def quota_table(self) -> QuotaTable | None:
        """The /quota routes' view (None until the server is ready)."""
        return self._quotas if self.ready else None

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
        if self.evictor is not None and not self.evictor.alive:
            problems.append("the watermark eviction thread is dead")
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

    # ----- upstream's admin routes (lmcache.http.admin.CacheAdmin) ---------------------

    def clear_tiers(self, tier: str, force: bool) -> dict[str, int]:
        """Clear L1 (only what nobody holds, unless ``force``), L2, or both."""
        counts: dict[str, int] = {}
        if tier in ("l1", "all"):
            if self.l1 is None:
                raise RuntimeError("server is not ready")
            if force:
                counts["l1_removed"], counts["l1_kept"] = self.l1.clear(), 0
            else:
                counts["l1_removed"], counts["l1_kept"] = l1_admin.clear_unlocked(self.l1)
            logger.info(
                "Cache cleared via HTTP API (%d chunks, %d locked kept)",
                counts["l1_removed"], counts["l1_kept"],
            )  # fmt: skip
        if tier in ("l2", "all"):
            counts["l2_removed"] = self.clear_l2()
        return counts

    def list_l1(
        self, after: ObjectKey | None, limit: int
    ) -> tuple[list[dict[str, Any]], ObjectKey | None]:
        if self.l1 is None:
            raise RuntimeError("server is not ready")
        return l1_admin.list_objects(self.l1, after, limit)

    def delete_l1(self, keys: list[ObjectKey], force: bool) -> tuple[int, int]:
        if self.l1 is None:
            raise RuntimeError("server is not ready")
        return l1_admin.delete(self.l1, keys, force)

    def config(self) -> dict[str, Any]:
        return self.settings.redacted()

    def version_info(self) -> dict[str, Any]:
        return {
            "version": __version__, "implementation": "lmcache (independent, multiprocess mode)",
            "instance_id": self.instance_id, "server_token": self.server_token,
        }  # fmt: skip

    def status(self) -> dict[str, Any]:
        zmq_server = self._zmq
        return {
            "version": __version__,
            "ready": self.ready,
            "healthy": not self.health(),
            "problems": self.health(),
            "server_token": self.server_token,  # an instance id, not a secret (no seal)
            "instance_id": self.instance_id,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started_at, 3),
            "zmq_endpoint": self.settings.zmq_bind_endpoint,
            "local_endpoint": self._zmq.local_endpoint if self._zmq else None,
            "l1": {
                **(self.l1.stats() if self.l1 else {}),
                "shm_segment": self._segment.name if self._segment else None,
            },
            "eviction": self.eviction_status(),
            "l2_adapters": self.tiers.status() if self.tiers else [],
            "kv_events": self._handler.kv_events.stats()
            if self._handler is not None and self._handler.kv_events is not None
            else None,
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
            # hit tokens and keys split by the tier that held them (l2: the lookup's prefetch)
            "lookups": self.metrics.lookup_summary(),
            "traffic": self.metrics.traffic_summary(),  # stored/retrieved tokens and bytes
            "sessions": {
                "active": len(self.sessions) if self.sessions else 0,
                "items": self.sessions.snapshot() if self.sessions else [],
            },
            "config": self.settings.redacted(),
        }

    def eviction_status(self) -> dict[str, Any]:
        s, ev = self.settings, self.evictor
        base = {"policy": s.eviction_policy, "watermark": s.eviction_trigger_watermark,
                "ratio": s.eviction_ratio, "interval_s": s.eviction_interval_s}  # fmt: skip
        if ev is None:
            return {**base, "alive": False, "runs": 0, "evicted": 0}
        return {**base, **ev.status()}

    def _metric_state(self) -> dict[str, Any]:
        empty = {"used_bytes": 0, "capacity_bytes": 0, "objects": 0, "locked": 0, "evictions": 0}
        return {
            "l1": self.l1.stats() if self.l1 else empty,
            "engines": len(self.registry.engines()),
            "sessions": len(self.sessions) if self.sessions else 0,
            "l2": self.tiers.status() if self.tiers else [],
        }
