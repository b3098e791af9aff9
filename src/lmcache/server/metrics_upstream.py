"""Upstream LMCache's metric names (``lmcache_mp_*``), for the metrics whose meaning we have.

Upstream (multiprocess mode) counts through OpenTelemetry; its Prometheus exporter turns
``lmcache_mp.l1_read`` with unit ``chunks`` into ``lmcache_mp_l1_read_chunks_total``. The
names below are those renderings, checked against upstream 0.5.6's own exporter, so that
its Grafana dashboard (``deploy/grafana/``) and its documented PromQL work unchanged.

Everything comes from the same per-thread tallies as our own names (`metrics_tallies`), summed at
scrape time, or from state read at scrape time: no extra work on the request path. A
metric we cannot honour (the event bus's, GPU block lifecycles, sampled chunk lifetimes,
the eviction loop's) is absent, never a fake zero: see `NOT_EXPOSED`. The ``cache_salt``
label is not exported (upstream documents dropping it: one series per tenant), and
``model_name`` is bounded (`lmcache.defaults.METRICS_MAX_MODELS`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from lmcache.server.metrics_tallies import GBPS_BUCKETS, Totals, cumulative

P = "lmcache_mp_"
_GBPS_LE = [floatToGoString(b) for b in (*GBPS_BUCKETS, float("inf"))]  # type: ignore[no-untyped-call]

# Upstream metrics (as Prometheus names) that this server does not expose, and why.
NOT_EXPOSED = {
    f"{P}l1_eviction_loop_ticks_total": "no background eviction loop (eviction is on demand)",
    f"{P}l1_eviction_loop_triggered_total": "no background eviction loop",
    f"{P}l1_read_failure_chunks_total": "a retrieve pins all its chunks or fails as a whole",
    f"{P}l2_evicted_objects_chunks_total": "L2 adapters do not count their evictions",
    f"{P}event_bus_queue_depth": "there is no event bus",
    f"{P}event_bus_drain_lag_seconds": "there is no event bus",
    f"{P}event_bus_dropped_events_total": "there is no event bus",
    f"{P}event_bus_subscriber_exceptions_total": "there is no event bus",
    f"{P}lookup_early_exit_requests_total": "its reasons (no GPU context, ...) do not occur",
    f"{P}l0_block_lifetime_seconds": "GPU block lifecycles are not reported to the server",
    f"{P}l0_block_idle_before_evict_seconds": "GPU block lifecycles are not reported",
    f"{P}l0_block_reuse_gap_seconds": "GPU block lifecycles are not reported",
    f"{P}l1_chunk_lifetime_seconds": "sampled chunk lifecycle histograms are not kept",
    f"{P}l1_chunk_idle_before_evict_seconds": "sampled chunk lifecycle histograms",
    f"{P}l1_chunk_reuse_gap_seconds": "sampled chunk lifecycle histograms",
    f"{P}l1_chunk_evict_reuse_gap_seconds": "sampled chunk lifecycle histograms",
    f"{P}real_reuse_gap_seconds": "sampled reuse histograms are not kept",
    f"{P}real_reuse_gap_objects_chunks": "sampled reuse histograms are not kept",
}

# (upstream name, help, our tally name, label names) for the labelled per-thread counts
_COUNTS = [
    ("lookup_requested_tokens", "tokens asked for by lookups whose hit is known",
     "lookup_requested", ["model_name"]),
    ("lookup_hit_tokens", "tokens found in L1 or L2 by lookups (the contiguous prefix)",
     "lookup_hit", ["model_name"]),
    ("lookup_hit_l1_tokens", "of lookup_hit: tokens L1 could serve by itself",
     "lookup_hit_l1", ["model_name"]),
    ("lookup_hit_l2_tokens", "of lookup_hit: tokens past L1's prefix, loaded from L2",
     "lookup_hit_l2", ["model_name"]),
    ("lookup_hit_l1_keys", "hit keys (one per rank and chunk) L1 already held",
     "lookup_hit_l1_keys", ["model_name"]),
    ("lookup_hit_l2_keys", "hit keys loaded from L2 into L1", "lookup_hit_l2_keys",
     ["model_name"]),
    ("lookups_requests", "lookups whose hit is known", "lookups", ["model_name"]),
    ("l1_allocation_failure_chunks", "chunks a store could not place: L1 full of locked "
     "chunks", "l1_allocation_failure", ["during", "model_name"]),
    ("num_chunks_loaded", "chunks copied back to engines", "chunks_loaded", ["model_name"]),
    ("l2_store_completed_requests", "copies to an L2 adapter done (one chunk each)",
     "l2_store_completed", ["l2_name"]),
    ("l2_load_completed_requests", "loads from an L2 adapter done (one chunk each)",
     "l2_load_completed", ["l2_name"]),
    ("l2_prefetch_failure_chunks", "chunks L2 had at lookup that did not reach L1",
     "l2_prefetch_failure", ["reason"]),
]  # fmt: skip

# (upstream name, help, our tally name): counts summed over their labels
_SUMS = [
    ("l1_read_chunks", "chunks read from L1 by retrieves", "l1_read"),
    ("l1_write_chunks", "chunks written to L1 by stores", "l1_write"),
    ("l2_store_completed_objects_chunks", "chunks copied to L2 (each adapter's copy counts)",
     "l2_store_completed"),
    ("l2_prefetch_lookup_requests", "lookups that asked L2 for the chunks L1 missed",
     "l2_prefetch_lookup"),
    ("l2_prefetch_lookup_objects_chunks", "chunk keys looked up in L2",
     "l2_prefetch_lookup_objects"),
    ("l2_prefetch_load_submitted_requests", "load tasks: one per adapter a lookup loads from",
     "l2_prefetch_load_submitted"),
    ("l2_prefetch_load_submitted_objects_chunks", "chunk keys submitted for loading from L2",
     "l2_prefetch_load_submitted_objects"),
    ("l2_prefetch_load_completed_chunks", "chunks loaded from L2 into L1",
     "l2_prefetch_load_completed"),
]  # fmt: skip

_TRANSFERS = [  # (upstream name, help, tally name, kind)
    ("num_submitted_stores", "store copies begun (engine memory to L1)", "submitted", "store"),
    ("num_finished_stores", "store copies ended, whatever their outcome", "finished", "store"),
    ("num_submitted_retrieves", "retrieve copies begun (L1 to engine memory)", "submitted",
     "retrieve"),
    ("num_finished_retrieves", "retrieve copies ended, whatever their outcome", "finished",
     "retrieve"),
]  # fmt: skip

_HISTOGRAMS = [  # (upstream name, help, tally name, label name)
    ("l0_l1_store_throughput_GB_per_second", "store throughput per request (engine memory to "
     "L1), GB/s", "l0_l1_store", "model_name"),
    ("l0_l1_load_throughput_GB_per_second", "retrieve throughput per request (L1 to engine "
     "memory), GB/s", "l0_l1_retrieve", "model_name"),
    ("l2_store_throughput_GB_per_second", "L1 to L2 throughput per chunk copy, GB/s",
     "l2_store", "l2_name"),
    ("l2_load_throughput_GB_per_second", "L2 to L1 throughput per chunk load, GB/s",
     "l2_load", "l2_name"),
]  # fmt: skip


class UpstreamCollector(Collector):
    def __init__(
        self, totals: Callable[[], Totals], read_state: Callable[[], dict[str, Any]],
        instance_id: str,
    ) -> None:  # fmt: skip
        self._totals = totals
        self._read = read_state
        self._instance_id = instance_id

    def collect(self) -> Iterator[Metric]:
        t, s = self._totals(), self._read()
        if self._instance_id:  # what OpenTelemetry's exporter shows of its resource
            yield InfoMetricFamily(
                "target", "Target metadata",
                value={"service_name": "lmcache", "service_instance_id": self._instance_id},
            )  # fmt: skip
        for name, doc, tally, labels in _COUNTS:
            family = CounterMetricFamily(P + name, doc, labels=labels)
            counts = {**dict.fromkeys(_known_zeros(tally, t, s), 0.0), **t.by_labels(tally)}
            for values, n in sorted(counts.items()):
                family.add_metric(list(values), n)
            yield family
        for name, doc, tally in _SUMS:
            yield CounterMetricFamily(P + name, doc, value=sum(t.by_labels(tally).values()))
        for name, doc, tally, kind in _TRANSFERS:
            yield CounterMetricFamily(P + name, doc, value=t.count(tally, kind))
        yield from _l1(s.get("l1", {}))
        yield from _l2(t, s.get("l2", []))
        yield from _histograms(t)


def _known_zeros(tally: str, t: Totals, s: dict[str, Any]) -> list[tuple[str, ...]]:
    """Failure series that are zero so far, shown as such (we know they are 0): a
    dashboard's rate() then reads 0 rather than nothing."""
    if tally == "l1_allocation_failure":  # for every model that stored something
        return [("l1_store", labels[0]) for labels in t.by_labels("l1_write") if labels]
    if tally == "l2_prefetch_failure" and s.get("l2"):
        return [("l1_oom",), ("not_found",)]
    return []


def _l1(l1: dict[str, Any]) -> Iterator[Metric]:
    used, capacity = l1.get("used_bytes", 0), l1.get("capacity_bytes", 0)
    yield GaugeMetricFamily(P + "l1_memory_usage_bytes", "bytes held in L1", value=used)
    yield GaugeMetricFamily(
        P + "l1_usage_ratio", "L1 used / L1 size (0-1)", value=used / capacity if capacity else 0
    )
    yield CounterMetricFamily(
        P + "l1_evicted_chunks", "chunks evicted from L1", value=l1.get("evictions", 0)
    )


def _l2(t: Totals, adapters: list[dict[str, Any]]) -> Iterator[Metric]:
    """The L2 series; none without L2 adapters (upstream shows none either)."""
    if not adapters:
        return
    queued = adapters[0].get("queue_accepted", 0)  # one queue for all adapters
    yield CounterMetricFamily(
        P + "l2_store_submitted_requests", "chunks queued for copying to L2", value=queued
    )
    yield CounterMetricFamily(
        P + "l2_store_submitted_objects_chunks", "chunks queued for copying to L2", value=queued
    )
    jobs = t.count("prefetch_jobs_started") - t.count("prefetch_jobs_ended")
    yield GaugeMetricFamily(P + "active_prefetch_jobs", "L2 prefetch jobs not done", value=jobs)
    usage = GaugeMetricFamily(
        P + "l2_usage_bytes", "bytes held in each L2 adapter", labels=["l2_name"]
    )
    gauges = [
        (GaugeMetricFamily(P + name, doc, labels=["l2_name", "adapter_index"]), start, end)
        for name, doc, start, end in (
            ("num_inflight_l2_stores", "copies to the adapter running now", "l2_store_started",
             "l2_store_ended"),
            ("num_inflight_l2_loads", "loads from the adapter running now", "l2_load_started",
             "l2_load_ended"),
            ("inflight_load_memory_usage_bytes", "L1 bytes being filled by loads from the "
             "adapter", "l2_load_bytes_started", "l2_load_bytes_ended"),
        )
    ]  # fmt: skip
    for index, a in enumerate(adapters):
        kind = str(a.get("type", a.get("name", "?")))
        if isinstance(a.get("bytes"), int | float):
            usage.add_metric([kind], float(a["bytes"]))
        labels = (kind, str(index))
        for family, start, end in gauges:
            family.add_metric(list(labels), t.count(start, *labels) - t.count(end, *labels))
    yield usage
    for family, _, _ in gauges:
        yield family


def _histograms(t: Totals) -> Iterator[Metric]:
    for name, doc, tally, label in _HISTOGRAMS:
        family = HistogramMetricFamily(P + name, doc, labels=[label])
        for (hist, labels), row in sorted(t.throughput.items()):
            if hist != tally:
                continue
            family.add_metric(list(labels), cumulative(_GBPS_LE, row), sum_value=row[-1])
        yield family
