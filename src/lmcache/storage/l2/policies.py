"""Tier policies: which L2 tiers a stored chunk goes to, and which are asked first on a read.

    store ──> StorePolicy.targets(adapters, up) ──> the tiers that get a copy
    lookup ─> PrefetchPolicy.order(adapters, up) ──> tiers asked in this order; for every
              chunk, the first tier that has it serves it ──> observe(tier, bytes, seconds)

As a priority function is to L1 eviction, a policy here only ranks tiers: the tiered store
(`lmcache.server.tiers.TieredStore`) stays generic, and a new policy is one small class and
one entry in `STORE_POLICIES` / `PREFETCH_POLICIES` (the names `--l2-store-policy` and
`--l2-prefetch-policy` accept).

``up(adapter)`` is False for a tier skipped after a recent failure (the circuit breaker);
a policy never returns such a tier, for writes or reads (a lookup must not wait for
a timeout).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Protocol

from lmcache.storage.l2.base import L2Adapter

Up = Callable[[L2Adapter], bool]


class StorePolicy(Protocol):
    """Which adapters a chunk is copied to, given which are up."""

    name: str

    def targets(self, adapters: Sequence[L2Adapter], up: Up) -> list[L2Adapter]: ...


class WriteAll:
    """Every tier that is up: a copy in each (the default)."""

    name = "all"

    def targets(self, adapters: Sequence[L2Adapter], up: Up) -> list[L2Adapter]:
        return [a for a in adapters if up(a)]


class WriteFirst:
    """The first tier that is up, in configured order: later tiers are a fallback chain
    that takes writes only while the earlier ones are down."""

    name = "first"

    def targets(self, adapters: Sequence[L2Adapter], up: Up) -> list[L2Adapter]:
        return next(([a] for a in adapters if up(a)), [])


class PrefetchPolicy(Protocol):
    """The order in which tiers are asked for the chunks a lookup misses in L1. A chunk
    held by several tiers is read from the first of them in this order."""

    name: str

    def order(self, adapters: Sequence[L2Adapter], up: Up) -> list[L2Adapter]: ...

    def observe(self, adapter: L2Adapter, nbytes: int, seconds: float) -> None:
        """One read of ``nbytes`` from ``adapter`` took ``seconds`` (called by several
        prefetch threads at once)."""
        ...


class InOrder:
    """--l2-adapter order (the default): list the near, fast tier first."""

    name = "order"

    def order(self, adapters: Sequence[L2Adapter], up: Up) -> list[L2Adapter]:
        return [a for a in adapters if up(a)]

    def observe(self, adapter: L2Adapter, nbytes: int, seconds: float) -> None:
        return None


class Fastest:
    """Highest measured read throughput first. For tiers that hold copies of the same chunks
    (``--l2-store-policy all``) but whose speed the operator cannot know in advance or that
    changes (a local disk under load, a Redis across a busy link): reads move to whichever
    is faster now.

    Throughput is an exponentially weighted average of bytes/second per read; a tier not
    read yet ranks first (in configured order), so that each is measured once. Ties keep
    configured order (Python's sort is stable)."""

    name = "fastest"

    def __init__(self, weight: float = 0.2) -> None:
        self.weight = weight  # of the newest read in the average
        self._gbps: dict[str, float] = {}
        self._lock = threading.Lock()

    def order(self, adapters: Sequence[L2Adapter], up: Up) -> list[L2Adapter]:
        with self._lock:
            speed = dict(self._gbps)
        return sorted(
            (a for a in adapters if up(a)), key=lambda a: -speed.get(a.name, float("inf"))
        )

    def observe(self, adapter: L2Adapter, nbytes: int, seconds: float) -> None:
        if nbytes <= 0 or seconds <= 0:
            return
        gbps = nbytes / seconds / 1e9
        with self._lock:
            old = self._gbps.get(adapter.name)
            self._gbps[adapter.name] = gbps if old is None else old + self.weight * (gbps - old)

    def speeds(self) -> dict[str, float]:
        """Measured GB/s per tier name, for /status."""
        with self._lock:
            return {name: float(f"{v:.4g}") for name, v in self._gbps.items()}


STORE_POLICIES: dict[str, Callable[[], StorePolicy]] = {"all": WriteAll, "first": WriteFirst}
PREFETCH_POLICIES: dict[str, Callable[[], PrefetchPolicy]] = {
    "order": InOrder,
    "fastest": Fastest,
}
