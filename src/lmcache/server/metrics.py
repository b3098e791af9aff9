"""Prometheus metrics (``lmcache_`` prefix, base units, ``_total`` counters).

Request counters and the latency histogram are plain numbers that each thread adds to
its own tallies (`_Tallies`): no lock and no prometheus_client call on the ZMQ loop
thread, which had spent ~5% of its time in them (3.4 us a lookup). A collector sums
the threads' tallies when /metrics is scraped. Gauges that describe state (L1 usage,
engines, sessions) are read at scrape time too, so the storage layer knows nothing
about Prometheus.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Info, disable_created_metrics
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from lmcache import __version__

# `_created` series double the output and no dashboard uses them.
disable_created_metrics()  # type: ignore[no-untyped-call]

_LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
)  # fmt: skip


class _StateCollector(Collector):
    def __init__(self, read: Callable[[], dict[str, Any]]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        s = self._read()
        gauges = {
            "lmcache_l1_used_bytes": ("L1 bytes allocated to objects", s["l1"]["used_bytes"]),
            "lmcache_l1_capacity_bytes": ("L1 pool size", s["l1"]["capacity_bytes"]),
            "lmcache_l1_committed_bytes": (
                "L1 pool bytes backed by memory (less than the size while a lazy pool grows)",
                s["l1"].get("committed_bytes", s["l1"]["capacity_bytes"]),
            ),
            "lmcache_l1_objects": ("chunks ready in L1", s["l1"]["objects"]),
            "lmcache_l1_locked_objects": ("L1 chunks pinned by a lock", s["l1"]["locked"]),
            "lmcache_engines": ("registered engine workers", s["engines"]),
            "lmcache_sessions": ("active lookup sessions", s["sessions"]),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(name, doc, value=value)
        yield CounterMetricFamily(
            "lmcache_l1_evictions", "chunks evicted from L1", value=s["l1"]["evictions"]
        )
        yield from _l2_metrics(s.get("l2", []))


# (metric, help, kind, stats field) for every L2 adapter, labelled by adapter name
_L2 = [
    ("lmcache_l2_objects", "objects in the adapter", "gauge", "objects"),
    ("lmcache_l2_bytes", "bytes in the adapter", "gauge", "bytes"),
    ("lmcache_l2_hits", "objects found", "counter", "hits"),
    ("lmcache_l2_misses", "objects not found (or corrupt)", "counter", "misses"),
    ("lmcache_l2_errors", "failed operations", "counter", "errors"),
    ("lmcache_l2_up", "1 while the adapter answers", "gauge", "healthy"),
    ("lmcache_l2_queue_depth", "chunks waiting to be copied to L2", "gauge", "queue_depth"),
    ("lmcache_l2_store_skipped", "chunks not copied: queue full", "counter", "queue_skipped_full"),
    (
        "lmcache_l2_prefetched_objects",
        "objects loaded from L2 into L1",
        "counter",
        "prefetched_objects",
    ),
]


def _l2_metrics(adapters: list[dict[str, Any]]) -> Iterator[Metric]:
    for name, doc, kind, stat in _L2:
        family: GaugeMetricFamily | CounterMetricFamily
        if kind == "gauge":
            family = GaugeMetricFamily(name, doc, labels=["adapter"])
        else:
            family = CounterMetricFamily(name, doc, labels=["adapter"])
        for a in adapters:
            value = a.get(stat)
            if isinstance(value, int | float):
                family.add_metric([str(a.get("name", "?"))], float(value))
        yield family


# name -> help, for the plain counters (each exported as <name>_total)
_COUNTERS = {
    "lmcache_stored_tokens": "tokens written to L1",
    "lmcache_stored_bytes": "bytes written to L1",
    "lmcache_retrieved_tokens": "tokens copied back to engines",
    "lmcache_retrieved_bytes": "bytes copied back to engines",
    "lmcache_lookup_requested_tokens": "tokens asked for by lookups",
    "lmcache_lookup_hit_tokens": "tokens found by lookups",
    "lmcache_store_no_space": "stores cut short because L1 was full of locked chunks",
}
_LE = [floatToGoString(b) for b in (*_LATENCY_BUCKETS, float("inf"))]  # type: ignore[no-untyped-call]


@dataclass
class _ThreadTally:
    """One thread's counts; only that thread writes them."""

    counts: dict[str, float] = field(default_factory=dict)
    requests: dict[tuple[str, str], int] = field(default_factory=dict)
    # op -> a count per latency bucket (the last one: +Inf), then the sum of seconds
    durations: dict[str, list[float]] = field(default_factory=dict)


class _Tallies:
    """Every thread's `_ThreadTally`, summed at scrape time. A thread's own ``+=`` on its
    own dict needs no lock; the scrape copies each dict (one C call, atomic under the
    GIL) and may miss an update in flight, which the next scrape sees."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._lock = threading.Lock()  # guards the list, taken once per thread
        self._threads: list[_ThreadTally] = []

    def mine(self) -> _ThreadTally:
        tally: _ThreadTally | None = getattr(self._local, "tally", None)
        if tally is None:
            tally = self._local.tally = _ThreadTally()
            with self._lock:
                self._threads.append(tally)  # kept after the thread ends: counts never drop
        return tally

    def totals(
        self,
    ) -> tuple[dict[str, float], dict[tuple[str, str], int], dict[str, list[float]]]:
        with self._lock:
            threads = list(self._threads)
        counts: dict[str, float] = {}
        requests: dict[tuple[str, str], int] = {}
        durations: dict[str, list[float]] = {}
        for t in threads:
            for name, n in t.counts.copy().items():
                counts[name] = counts.get(name, 0) + n
            for key, k in t.requests.copy().items():
                requests[key] = requests.get(key, 0) + k
            for op, row in t.durations.copy().items():
                total = durations.setdefault(op, [0.0] * len(row))
                for i, v in enumerate(list(row)):  # a copy: the owner may be adding to it
                    total[i] += v
        return counts, requests, durations


class _Count:
    """What the handlers call ``metrics.<counter>.inc(n)`` on: a plain per-thread sum."""

    __slots__ = ("_name", "_tallies")

    def __init__(self, name: str, tallies: _Tallies) -> None:
        self._name = name
        self._tallies = tallies

    def inc(self, amount: float = 1) -> None:
        counts = self._tallies.mine().counts
        counts[self._name] = counts.get(self._name, 0) + amount


class _RequestCollector(Collector):
    def __init__(self, tallies: _Tallies) -> None:
        self._tallies = tallies

    def collect(self) -> Iterator[Metric]:
        counts, requests, durations = self._tallies.totals()
        for name, doc in _COUNTERS.items():
            yield CounterMetricFamily(name, doc, value=counts.get(name, 0))
        family = CounterMetricFamily(
            "lmcache_requests", "requests handled", labels=["op", "outcome"]
        )
        for (op, outcome), k in sorted(requests.items()):
            family.add_metric([op, outcome], k)
        yield family
        histogram = HistogramMetricFamily(
            "lmcache_request_duration_seconds",
            "time to handle a request, copies included",
            labels=["op"],
        )
        for op, row in sorted(durations.items()):
            cumulative, buckets = 0.0, []
            for le, n in zip(_LE, row[:-1], strict=True):
                cumulative += n
                buckets.append((le, cumulative))
            histogram.add_metric([op], buckets, sum_value=row[-1])
        yield histogram


class Metrics:
    def __init__(self, read_state: Callable[[], dict[str, Any]]) -> None:
        self.registry = CollectorRegistry()
        self._tallies = _Tallies()
        t = self._tallies
        self.stored_tokens = _Count("lmcache_stored_tokens", t)
        self.stored_bytes = _Count("lmcache_stored_bytes", t)
        self.retrieved_tokens = _Count("lmcache_retrieved_tokens", t)
        self.retrieved_bytes = _Count("lmcache_retrieved_bytes", t)
        self.lookup_requested_tokens = _Count("lmcache_lookup_requested_tokens", t)
        self.lookup_hit_tokens = _Count("lmcache_lookup_hit_tokens", t)
        self.store_no_space = _Count("lmcache_store_no_space", t)
        Info("lmcache_build", "server version", registry=self.registry).info(
            {"version": __version__}
        )
        self.registry.register(_RequestCollector(t))
        self.registry.register(_StateCollector(read_state))

    def observe_request(self, op: str, outcome: str, seconds: float) -> None:
        """Count one request and its duration in this thread's tally."""
        tally = self._tallies.mine()
        key = (op, outcome)
        tally.requests[key] = tally.requests.get(key, 0) + 1
        row = tally.durations.get(op)
        if row is None:
            row = tally.durations[op] = [0.0] * (len(_LE) + 1)
        row[bisect_left(_LATENCY_BUCKETS, seconds)] += 1  # the first bucket with le >= seconds
        row[-1] += seconds
