"""The per-thread tallies behind every request metric: plain numbers that only their own
thread adds to, summed when /metrics (or /status) is read.

Its own module because it is the one place where counting happens on the request path,
and its rule is what keeps that path cheap: no lock and no prometheus_client call on the
ZMQ loop thread, which had spent ~5% of its time in them (3.4 us a lookup). Both name
sets read the sums from here (`lmcache.server.metrics` for ours,
`lmcache.server.metrics_upstream` for upstream's ``lmcache_mp_*``), so they can never
disagree.

A histogram is a *row*: a count per bucket (the last one +Inf), then the sum.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
)  # fmt: skip
# Upper bounds of the GB/s histograms: OpenTelemetry's default boundaries, which upstream's
# ``*_throughput_GB_per_second`` histograms use.
GBPS_BUCKETS = (0.0, 5.0, 10.0, 25.0, 50.0, 75.0, 100.0, 250.0, 500.0, 750.0, 1000.0, 2500.0,
                5000.0, 7500.0, 10000.0)  # fmt: skip

# What a lookup row sums, as the labelled counts `Totals` shows them (by model name).
LOOKUP_SUMS = ("lookups", "lookup_requested", "lookup_hit", "lookup_hit_l1",
               "lookup_hit_l1_keys", "lookup_hit_l2_keys")  # fmt: skip


@dataclass
class Totals:
    """Every thread's tallies, summed (one scrape's view)."""

    counts: dict[str, float] = field(default_factory=dict)
    requests: dict[tuple[str, str], int] = field(default_factory=dict)
    # op -> a latency row (`LATENCY_BUCKETS`)
    durations: dict[str, list[float]] = field(default_factory=dict)
    # (name, label values) -> count: the counts that carry labels (a model name, a tier)
    labelled: dict[tuple[str, tuple[str, ...]], float] = field(default_factory=dict)
    # (name, label values) -> a throughput row (`GBPS_BUCKETS`)
    throughput: dict[tuple[str, tuple[str, ...]], list[float]] = field(default_factory=dict)

    def count(self, name: str, *labels: str) -> float:
        return self.labelled.get((name, labels), 0.0)

    def by_labels(self, name: str) -> dict[tuple[str, ...], float]:
        return {k[1]: v for k, v in self.labelled.items() if k[0] == name}


@dataclass
class ThreadTally(Totals):
    """One thread's counts, in the shape of `Totals`; only that thread writes them."""

    # model label -> its lookups' sums, in `LOOKUP_SUMS` order: one dict look-up a lookup
    # (the ZMQ loop's cost); spread into ``labelled`` names at scrape time (`_spread`)
    lookups: dict[str, list[float]] = field(default_factory=dict)


def cumulative(le: list[str], row: list[float]) -> list[tuple[str, float]]:
    """A row's buckets as Prometheus wants them: (``le`` label, count up to it)."""
    total, buckets = 0.0, []
    for bound, n in zip(le, row[:-1], strict=True):
        total += n
        buckets.append((bound, total))
    return buckets


def _add_rows(into: dict[Any, list[float]], rows: dict[Any, list[float]]) -> None:
    for key, row in rows.copy().items():
        total = into.setdefault(key, [0.0] * len(row))
        for i, v in enumerate(list(row)):  # a copy: the owner may be adding to it
            total[i] += v


class Tallies:
    """Every thread's `ThreadTally`, summed at scrape time. A thread's own ``+=`` on its
    own dict needs no lock; the scrape copies each dict (one C call, atomic under the
    GIL) and may miss an update in flight, which the next scrape sees."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._lock = threading.Lock()  # guards the list, taken once per thread
        self._threads: list[ThreadTally] = []

    def mine(self) -> ThreadTally:
        tally: ThreadTally | None = getattr(self._local, "tally", None)
        if tally is None:
            tally = self._local.tally = ThreadTally()
            with self._lock:
                self._threads.append(tally)  # kept after the thread ends: counts never drop
        return tally

    def totals(self) -> Totals:
        with self._lock:
            threads = list(self._threads)
        out = Totals()
        for t in threads:
            for name, n in t.counts.copy().items():
                out.counts[name] = out.counts.get(name, 0) + n
            for key, k in t.requests.copy().items():
                out.requests[key] = out.requests.get(key, 0) + k
            for lkey, n in t.labelled.copy().items():
                out.labelled[lkey] = out.labelled.get(lkey, 0) + n
            _add_rows(out.durations, t.durations)
            _add_rows(out.throughput, t.throughput)
            for label, row in t.lookups.copy().items():
                _spread(out, label, list(row))
        return out


def _spread(out: Totals, label: str, row: list[float]) -> None:
    """Add one thread's lookup sums for model ``label`` to ``out``'s labelled counts."""
    sums = dict(zip(LOOKUP_SUMS, row, strict=True))
    sums["lookup_hit_l2"] = sums["lookup_hit"] - sums["lookup_hit_l1"]
    tiers = {
        ("lmcache_lookup_hit_tier_tokens", ("l1",)): sums["lookup_hit_l1"],
        ("lmcache_lookup_hit_tier_tokens", ("l2",)): sums["lookup_hit_l2"],
        ("lmcache_lookup_hit_keys", ("l1",)): sums["lookup_hit_l1_keys"],
        ("lmcache_lookup_hit_keys", ("l2",)): sums["lookup_hit_l2_keys"],
        **{(name, (label,)): n for name, n in sums.items()},
    }
    for key, n in tiers.items():
        out.labelled[key] = out.labelled.get(key, 0) + n
    out.counts["lmcache_lookup_hit_tokens"] = (
        out.counts.get("lmcache_lookup_hit_tokens", 0) + sums["lookup_hit"]
    )


class Count:
    """What the handlers call ``metrics.<counter>.inc(n)`` on: a plain per-thread sum."""

    __slots__ = ("_name", "_tallies")

    def __init__(self, name: str, tallies: Tallies) -> None:
        self._name = name
        self._tallies = tallies

    def inc(self, amount: float = 1) -> None:
        counts = self._tallies.mine().counts
        counts[self._name] = counts.get(self._name, 0) + amount
