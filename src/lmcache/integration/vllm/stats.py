"""The connector's counters, as vLLM collects them (``get_kv_connector_stats``).

Each side counts what it does, and vLLM takes the counts after every step, sums the
ranks' and the scheduler's (`LMCacheConnectorStats.aggregate`), logs a summary every
interval ("KV Transfer metrics: ...") and adds them to its Prometheus counters
(`LMCachePromMetrics`, ``vllm:lmcache_*`` on vLLM's own ``/metrics``).

    scheduler: lookup_tokens (asked of the server), hit_tokens (the server had)
    worker:    load_tokens, load_bytes, load_seconds, failed_loads,
               store_tokens, store_bytes, store_seconds, failed_stores

Tokens and failures are counted by KV rank 0 only (every rank moves its shard of the same
tokens); bytes and seconds by every rank (the bytes each moved; seconds of copy time,
summed over ranks). This module does not import vLLM (unit-tested without it).
"""

from __future__ import annotations

import threading

FIELDS = (
    "lookup_tokens",
    "hit_tokens",
    "load_tokens",
    "load_bytes",
    "load_seconds",
    "failed_loads",
    "store_tokens",
    "store_bytes",
    "store_seconds",
    "failed_stores",
)
SECONDS = frozenset({"load_seconds", "store_seconds"})


class Tally:
    """Counters since the last `take`; the store thread and the step both add."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._data: dict[str, float] = {}

    def add(self, **counts: float) -> None:
        with self._lock:
            for name, value in counts.items():
                if name not in FIELDS:
                    raise KeyError(name)
                if value:
                    self._data[name] = self._data.get(name, 0) + value

    def take(self) -> dict[str, float] | None:
        """The counts since the last call (every field, zeros included), or None if
        nothing happened (vLLM then sends nothing)."""
        with self._lock:
            data, self._data = self._data, {}
        if not data:
            return None
        return {name: data.get(name, 0) for name in FIELDS}


def merged(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """The sum of two counts (the ranks', the scheduler's, or two steps')."""
    return {name: a.get(name, 0) + b.get(name, 0) for name in FIELDS}


def summary(data: dict[str, float]) -> dict[str, int | float]:
    """What vLLM's periodic log line shows: counts, hit rate, and copy throughput."""
    out: dict[str, int | float] = {}
    for name in FIELDS:
        value = data.get(name, 0)
        out[name] = round(value, 4) if name in SECONDS else int(value)
    looked = data.get("lookup_tokens", 0)
    out["hit_rate"] = round(data.get("hit_tokens", 0) / looked, 4) if looked else 0.0
    for what in ("load", "store"):
        seconds = data.get(f"{what}_seconds", 0)
        gbps = data.get(f"{what}_bytes", 0) / seconds / 1e9 if seconds else 0.0
        out[f"{what}_gb_per_s"] = round(gbps, 3)
    return out
