"""Prometheus metrics (``lmcache_`` prefix, base units, ``_total`` counters), and upstream
LMCache's ``lmcache_mp_*`` names beside them (`lmcache.server.metrics_upstream`;
``--metrics-names ours|upstream|both``).

Request counters and the latency histogram are plain numbers that each thread adds to
its own tallies (`lmcache.server.metrics_tallies`), summed when /metrics is scraped.
Gauges that describe state (L1 usage, engines, sessions) are read at scrape time too, so
the storage layer knows nothing about Prometheus.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Callable, Iterator
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
from lmcache.defaults import METRICS_MAX_MODELS, METRICS_NAMES
from lmcache.server.metrics_tallies import (
    GBPS_BUCKETS,
    LATENCY_BUCKETS,
    LOOKUP_SUMS,
    Count,
    Tallies,
    ThreadTally,
    cumulative,
)
from lmcache.server.metrics_upstream import UpstreamCollector

MetricsNames = str  # "ours", "upstream" or "both" (`lmcache.settings.MetricsNamesChoice`)

# `_created` series double the output and no dashboard uses them.
disable_created_metrics()  # type: ignore[no-untyped-call]


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
# (name, help, label) for the L1/L2 split of lookup hits, exported as <name>_total{tier}
_TIER_COUNTERS = [
    ("lmcache_lookup_hit_tier_tokens", "tokens found by lookups, by the tier that held them "
     "(l2: loaded into L1 by the lookup's prefetch)", "tier"),
    ("lmcache_lookup_hit_keys", "chunk keys (one per rank and chunk) found by lookups, by "
     "the tier that held them", "tier"),
]  # fmt: skip
_LE = [floatToGoString(b) for b in (*LATENCY_BUCKETS, float("inf"))]  # type: ignore[no-untyped-call]


class _RequestCollector(Collector):
    def __init__(self, tallies: Tallies) -> None:
        self._tallies = tallies

    def collect(self) -> Iterator[Metric]:
        totals = self._tallies.totals()
        counts, requests, durations = totals.counts, totals.requests, totals.durations
        for name, doc in _COUNTERS.items():
            yield CounterMetricFamily(name, doc, value=counts.get(name, 0))
        for name, doc, label in _TIER_COUNTERS:
            tiers = CounterMetricFamily(name, doc, labels=[label])
            for tier in ("l1", "l2"):
                tiers.add_metric([tier], totals.count(name, tier))
            yield tiers
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
            histogram.add_metric([op], cumulative(_LE, row), sum_value=row[-1])
        yield histogram


class Metrics:
    """What the server counts. The request threads call the methods below; each adds to
    its own thread's tally (no lock). ``names`` says which names /metrics shows: ours
    (``lmcache_*``), upstream LMCache's (``lmcache_mp_*``) or both (`--metrics-names`)."""

    def __init__(
        self,
        read_state: Callable[[], dict[str, Any]],
        *,
        names: MetricsNames = METRICS_NAMES,
        instance_id: str = "",
    ) -> None:
        self.registry = CollectorRegistry()
        self._tallies = Tallies()
        self._models: dict[str, str] = {}  # bounded: see `_model`
        self._models_lock = threading.Lock()
        t = self._tallies
        self.stored_tokens = Count("lmcache_stored_tokens", t)
        self.stored_bytes = Count("lmcache_stored_bytes", t)
        self.retrieved_tokens = Count("lmcache_retrieved_tokens", t)
        self.retrieved_bytes = Count("lmcache_retrieved_bytes", t)
        self.lookup_requested_tokens = Count("lmcache_lookup_requested_tokens", t)
        self.lookup_hit_tokens = Count("lmcache_lookup_hit_tokens", t)
        self.store_no_space = Count("lmcache_store_no_space", t)
        if names in ("ours", "both"):
            Info("lmcache_build", "server version", registry=self.registry).info(
                {"version": __version__}
            )
            self.registry.register(_RequestCollector(t))
            self.registry.register(_StateCollector(read_state))
        if names in ("upstream", "both"):
            self.registry.register(UpstreamCollector(t.totals, read_state, instance_id))

    def observe_request(self, op: str, outcome: str, seconds: float) -> None:
        """Count one request and its duration in this thread's tally."""
        tally = self._tallies.mine()
        key = (op, outcome)
        tally.requests[key] = tally.requests.get(key, 0) + 1
        row = tally.durations.get(op)
        if row is None:
            row = tally.durations[op] = [0.0] * (len(_LE) + 1)
        row[bisect_left(LATENCY_BUCKETS, seconds)] += 1  # the first bucket with le >= seconds
        row[-1] += seconds

    def _model(self, name: str) -> str:
        """``name`` as a label value: the model names clients send are theirs to choose, so
        only the first `METRICS_MAX_MODELS` get series of their own (the rest: "other")."""
        label = self._models.get(name)
        if label is None:
            with self._models_lock:
                full = len(self._models) >= METRICS_MAX_MODELS
                label = self._models.setdefault(name, "other" if full else name)
        return label

    def _add(self, tally: ThreadTally, name: str, labels: tuple[str, ...], n: float) -> None:
        key = (name, labels)
        tally.labelled[key] = tally.labelled.get(key, 0) + n

    def count(self, name: str, labels: tuple[str, ...] = (), n: float = 1) -> None:
        """Add ``n`` to the labelled count ``name`` in this thread's tally (the L2 tiers'
        counts: `lmcache.server.tiers`; names as `lmcache.server.metrics_upstream` reads)."""
        self._add(self._tallies.mine(), name, labels, n)

    def lookup_done(
        self, model: str, *, requested: int, hit: int, l1_tokens: int, l1_keys: int,
        l2_keys: int,
    ) -> None:  # fmt: skip
        """One lookup whose hit is known: ``hit`` tokens, of which ``l1_tokens`` L1 held on
        its own (the rest needed chunks its L2 prefetch loaded); keys: every rank's."""
        lookups = self._tallies.mine().lookups
        label = self._models.get(model) or self._model(model)
        row = lookups.get(label)
        if row is None:
            row = lookups[label] = [0.0] * len(LOOKUP_SUMS)
        row[0] += 1
        row[1] += requested
        row[2] += hit
        row[3] += l1_tokens
        row[4] += l1_keys
        row[5] += l2_keys

    def copy_started(self, kind: str) -> None:
        """A store or retrieve copy begins (``kind``: "store" or "retrieve"); every one is
        matched by a `copy_done` (whatever its outcome), so their difference is in flight."""
        tally = self._tallies.mine()
        self._add(tally, "submitted", (kind,), 1)

    def copy_done(
        self, kind: str, model: str, *, chunks: int, nbytes: int, seconds: float,
        no_space_chunks: int = 0, finished: bool = True,
    ) -> None:  # fmt: skip
        """A store wrote (a retrieve read) ``chunks`` chunks, ``nbytes``, in ``seconds``;
        ``finished``: it had been counted by `copy_started` (a worker's own copy was not)."""
        tally = self._tallies.mine()
        m = (self._model(model),)
        if finished:
            self._add(tally, "finished", (kind,), 1)
        else:  # the engine's worker did the copy: we learn of it when it is done
            self._add(tally, "submitted", (kind,), 1)
            self._add(tally, "finished", (kind,), 1)
        self._add(tally, "l1_write" if kind == "store" else "l1_read", m, chunks)
        if kind == "retrieve":
            self._add(tally, "chunks_loaded", m, chunks)
        if no_space_chunks:
            self._add(tally, "l1_allocation_failure", ("l1_store", m[0]), no_space_chunks)
        if nbytes and seconds > 0:
            self.observe_gbps(f"l0_l1_{kind}", m, nbytes / seconds / 1e9)

    def observe_gbps(self, name: str, labels: tuple[str, ...], gbps: float) -> None:
        """One transfer's throughput into histogram ``name`` (GB/s), this thread's tally."""
        tally = self._tallies.mine()
        row = tally.throughput.get((name, labels))
        if row is None:
            row = tally.throughput[(name, labels)] = [0.0] * (len(GBPS_BUCKETS) + 2)
        row[bisect_left(GBPS_BUCKETS, gbps)] += 1
        row[-1] += gbps

    def lookup_summary(self) -> dict[str, float]:
        """The lookup counts for /status: requested and hit tokens, and the hit's L1/L2
        split (tokens and keys)."""
        t = self._tallies.totals()
        return {
            "requested_tokens": t.counts.get("lmcache_lookup_requested_tokens", 0),
            "hit_tokens": t.counts.get("lmcache_lookup_hit_tokens", 0),
            "hit_l1_tokens": t.count("lmcache_lookup_hit_tier_tokens", "l1"),
            "hit_l2_tokens": t.count("lmcache_lookup_hit_tier_tokens", "l2"),
            "hit_l1_keys": t.count("lmcache_lookup_hit_keys", "l1"),
            "hit_l2_keys": t.count("lmcache_lookup_hit_keys", "l2"),
        }

    def traffic_summary(self) -> dict[str, float]:
        """The copy counts for /status (the dashboard's rates): tokens and bytes stored
        and retrieved, and stores cut short for lack of L1 space."""
        counts = self._tallies.totals().counts
        names = ("stored_tokens", "stored_bytes", "retrieved_tokens", "retrieved_bytes",
                 "store_no_space")  # fmt: skip
        return {name: counts.get(f"lmcache_{name}", 0) for name in names}
