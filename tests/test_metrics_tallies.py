"""The request metrics are per-thread tallies summed at scrape time: /metrics must show
the same names, labels and values as prometheus_client's own Counter and Histogram fed
the same requests (what the server used before), whichever threads counted them."""

from __future__ import annotations

import threading

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from lmcache.server.metrics import _COUNTERS, Metrics, _RequestCollector
from lmcache.server.metrics_tallies import LATENCY_BUCKETS, Tallies

REQUESTS = [
    ("lookup", "ok", 0.00005), ("lookup", "ok", 0.0001), ("lookup", "ok", 0.0003),
    ("store", "ok", 0.02), ("store", "no_space", 0.5), ("retrieve", "ok", 12.0),
    ("lookup", "bad_request", 0.0), ("retrieve", "ok", 0.001),
]  # fmt: skip
COUNTS = [
    ("stored_tokens", 256), ("stored_bytes", 1 << 20), ("retrieved_tokens", 512),
    ("retrieved_bytes", 3 << 20), ("lookup_requested_tokens", 4096),
    ("lookup_hit_tokens", 1024), ("store_no_space", 1),
]  # fmt: skip


def reference() -> CollectorRegistry:
    """The metrics as the server kept them before: prometheus_client objects."""
    r = CollectorRegistry()
    counters = {n: Counter(n, doc, registry=r) for n, doc in _COUNTERS.items()}
    requests = Counter("lmcache_requests", "requests handled", ("op", "outcome"), registry=r)
    duration = Histogram(
        "lmcache_request_duration_seconds", "time to handle a request, copies included",
        ("op",), buckets=LATENCY_BUCKETS, registry=r,
    )  # fmt: skip
    for _ in range(3):
        for op, outcome, seconds in REQUESTS:
            requests.labels(op, outcome).inc()
            duration.labels(op).observe(seconds)
        for name, n in COUNTS:
            counters[f"lmcache_{name}"].inc(n)
    return r


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        # the state gauges, upstream's names and the lookup split: tests/test_upstream_metrics.py
        if not family.name.startswith(
            (
                "lmcache_l1",
                "lmcache_l2",
                "lmcache_build",
                "lmcache_mp_",
                "target",
                "lmcache_lookup_hit_tier",
                "lmcache_lookup_hit_keys",
            )
        )
        and family.name not in ("lmcache_engines", "lmcache_sessions")
        for s in family.samples
    }


def test_tallies_from_several_threads_match_prometheus_client() -> None:
    state = {"l1": {"used_bytes": 0, "capacity_bytes": 1, "objects": 0, "locked": 0,
                    "evictions": 0}, "engines": 0, "sessions": 0}  # fmt: skip
    metrics = Metrics(lambda: state)

    def work() -> None:  # one pass of every request and count, on its own thread
        for op, outcome, seconds in REQUESTS:
            metrics.observe_request(op, outcome, seconds)
        for name, n in COUNTS:
            getattr(metrics, name).inc(n)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()  # the counts of finished threads stay
    work()  # and this thread's
    got, want = samples(metrics.registry), samples(reference())
    assert got.keys() == want.keys()
    assert got == {k: pytest.approx(v) for k, v in want.items()}  # sums: another order
    assert got[("lmcache_requests_total", (("op", "lookup"), ("outcome", "ok")))] == 9
    assert (
        got[("lmcache_request_duration_seconds_bucket", (("le", "0.0001"), ("op", "lookup")))] == 9
    )
    assert (
        got[("lmcache_request_duration_seconds_bucket", (("le", "+Inf"), ("op", "retrieve")))] == 6
    )
    assert got[("lmcache_lookup_requested_tokens_total", ())] == 3 * 4096


def test_nothing_counted_yet_shows_zero_counters_and_no_request_series() -> None:
    registry = CollectorRegistry()
    registry.register(_RequestCollector(Tallies()))
    text = generate_latest(registry).decode()
    assert "lmcache_stored_tokens_total 0.0" in text
    assert "# TYPE lmcache_request_duration_seconds histogram" in text
    assert "lmcache_requests_total{" not in text
