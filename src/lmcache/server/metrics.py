"""Prometheus metrics (``lmcache_`` prefix, base units, ``_total`` counters).

Counters and histograms are updated by the request handlers; gauges that
describe state (L1 usage, engines, sessions) are read at scrape time through a
collector, so the storage layer knows nothing about Prometheus.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, Info, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

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
    for name, doc, kind, field in _L2:
        family: GaugeMetricFamily | CounterMetricFamily
        if kind == "gauge":
            family = GaugeMetricFamily(name, doc, labels=["adapter"])
        else:
            family = CounterMetricFamily(name, doc, labels=["adapter"])
        for a in adapters:
            value = a.get(field)
            if isinstance(value, int | float):
                family.add_metric([str(a.get("name", "?"))], float(value))
        yield family


class Metrics:
    def __init__(self, read_state: Callable[[], dict[str, Any]]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.stored_tokens = Counter("lmcache_stored_tokens", "tokens written to L1", registry=r)
        self.stored_bytes = Counter("lmcache_stored_bytes", "bytes written to L1", registry=r)
        self.retrieved_tokens = Counter(
            "lmcache_retrieved_tokens", "tokens copied back to engines", registry=r
        )
        self.retrieved_bytes = Counter(
            "lmcache_retrieved_bytes", "bytes copied back to engines", registry=r
        )
        self.lookup_requested_tokens = Counter(
            "lmcache_lookup_requested_tokens", "tokens asked for by lookups", registry=r
        )
        self.lookup_hit_tokens = Counter(
            "lmcache_lookup_hit_tokens", "tokens found by lookups", registry=r
        )
        self.store_no_space = Counter(
            "lmcache_store_no_space", "stores cut short because L1 was full of locked chunks",
            registry=r,
        )  # fmt: skip
        self.requests = Counter(
            "lmcache_requests", "requests handled", ("op", "outcome"), registry=r
        )
        self.request_duration = Histogram(
            "lmcache_request_duration_seconds",
            "time to handle a request, copies included",
            ("op",),
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        Info("lmcache_build", "server version", registry=r).info({"version": __version__})
        self._children: dict[tuple[str, str], tuple[Any, Any]] = {}
        r.register(_StateCollector(read_state))

    def observe_request(self, op: str, outcome: str, seconds: float) -> None:
        """Count one request (labelled children are cached: ``labels()`` is slow)."""
        children = self._children.get((op, outcome))
        if children is None:
            children = (
                self.requests.labels(op, outcome),
                self.request_duration.labels(op),
            )
            self._children[(op, outcome)] = children
        children[0].inc()
        children[1].observe(seconds)
