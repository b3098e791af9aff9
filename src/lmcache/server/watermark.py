"""Background eviction at a watermark (``--eviction-trigger-watermark``, ``--eviction-ratio``).

    every --eviction-interval-s:  used / capacity >= watermark ?
        yes ─> one INFO line ─> L1Cache.evict_to((watermark - ratio) x capacity)
        (unpinned objects, in the policy's order, in batches so lookups get in between)

Usage is counted in bytes against the configured capacity (``--l1-size-gb``, also for a
lazy pool that has not grown to it), and the thread frees down to a byte target:
upstream counts keys (``ratio`` of the tracked keys per trigger), which frees little when
the oldest objects are small; bytes are what the watermark is about. On-demand eviction
(a store that finds no room) is unchanged: this only keeps room free ahead of stores.

Supervised: an exception in a tick is logged once (then counted, and logged again only
when it changes), and the thread goes on; upstream's died with it (LMCache#4817) and left
L1 full. `alive` goes to /status and /healthcheck, which reports a dead thread.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from lmcache.storage.l1 import L1Cache

logger = logging.getLogger("lmcache.server")


class WatermarkEvictor:
    def __init__(self, l1: L1Cache, watermark: float, ratio: float, interval_s: float) -> None:
        self.l1 = l1
        self.watermark = watermark
        self.ratio = ratio
        self.interval_s = interval_s
        self.runs = 0  # ticks that found usage at or above the watermark
        self.evicted = 0
        self.errors = 0
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lmcache-eviction", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.tick()
            except Exception as exc:  # keep running: a dead thread freezes a full L1
                self.errors += 1
                text = f"{type(exc).__name__}: {exc}"
                if text != self.last_error:
                    logger.exception("L1 watermark eviction failed (the thread goes on)")
                self.last_error = text

    def tick(self) -> int:
        """One check; returns how many objects it evicted."""
        used, capacity = self.l1.usage()
        if capacity <= 0 or used / capacity < self.watermark:
            return 0
        self.runs += 1
        logger.info(
            "L1 memory usage %.2f above watermark %.2f; triggering eviction.",
            used / capacity, self.watermark,
        )  # fmt: skip
        # Rounded: 0.7 - 0.3 is 0.39999999999999997 in floats, a page short of 40%.
        target = int(round(max(0.0, self.watermark - self.ratio), 9) * capacity)
        evicted = self.l1.evict_to(target)
        self.evicted += evicted
        return evicted

    def status(self) -> dict[str, Any]:
        return {
            "alive": self.alive, "runs": self.runs, "evicted": self.evicted,
            "errors": self.errors, "last_error": self.last_error,
        }  # fmt: skip
