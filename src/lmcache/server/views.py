"""What the HTTP frontend reads from, and asks of, the running server: `ServerView`
(health, /status, the clears), `CacheAdmin` (upstream's admin routes), the /quota table,
and the state /metrics reads at scrape time.

Kept apart from `lmcache.server.runtime` (allocate, start, maintain, stop) because none
of it changes the server's life: it reads the parts `ServerRuntime.start` made, or hands
an operator's action to them. It is a base class of `ServerRuntime`, not an object of its
own, because those parts change under it (None until start-up, released at stop) and
every view must see them as they are at the moment it answers.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from lmcache import __version__
from lmcache.server.handlers import RequestHandler
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
from lmcache.storage.shm import ShmSegment
from lmcache.transport.zmq_server import ZmqServer
from lmcache.types import ObjectKey

logger = logging.getLogger("lmcache.server")


class RuntimeViews:
    """The views over the runtime's parts; `ServerRuntime` sets the attributes below."""

    settings: ServerSettings
    server_token: str
    instance_id: str
    started_at: float
    ready: bool
    registry: EngineRegistry
    metrics: Metrics
    _maintenance: threading.Thread
    # What `start` makes or learns: None until then.
    startup_error: str | None = None
    maintenance_error: str | None = None
    l1: L1Cache | None = None
    sessions: Sessions | None = None
    tiers: TieredStore | None = None
    evictor: WatermarkEvictor | None = None  # only with --eviction-trigger-watermark
    _segment: ShmSegment | None = None
    _zmq: ZmqServer | None = None
    _prepared: PreparedTransfers | None = None
    _handler: RequestHandler | None = None
    _quotas: QuotaTable | None = None

    def quota_table(self) -> QuotaTable | None:
        """The /quota routes' view (None until the server is ready)."""
        return self._quotas if self.ready else None

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
        removed = self._ready_l1().clear()
        logger.info("Cache cleared via HTTP API (%d chunks)", removed)
        return removed

    # ----- upstream's admin routes (lmcache.http.admin.CacheAdmin) ---------------------

    def clear_tiers(self, tier: str, force: bool) -> dict[str, int]:
        """Clear L1 (only what nobody holds, unless ``force``), L2, or both."""
        counts: dict[str, int] = {}
        if tier in ("l1", "all"):
            l1 = self._ready_l1()
            if force:
                counts["l1_removed"], counts["l1_kept"] = l1.clear(), 0
            else:
                counts["l1_removed"], counts["l1_kept"] = l1_admin.clear_unlocked(l1)
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
        return l1_admin.list_objects(self._ready_l1(), after, limit)

    def delete_l1(self, keys: list[ObjectKey], force: bool) -> tuple[int, int]:
        return l1_admin.delete(self._ready_l1(), keys, force)

    def _ready_l1(self) -> L1Cache:
        if self.l1 is None:
            raise RuntimeError("server is not ready")
        return self.l1

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
