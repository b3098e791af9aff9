"""vLLM's types for what the connector reports: stats, Prometheus metrics, KV events.

These subclass vLLM's own bases, so this module imports vLLM (the counting and the
event logic they wrap live in `stats.py` and `kv_events.py`, which do not).
vLLM builds them from the connector class (`LMCacheMPConnector.build_kv_connector_stats`
and `build_prom_metrics`), in the engine and in the API server process alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_events import KVCacheEvent, KVConnectorKVEvents
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
)

from lmcache.integration.vllm.stats import FIELDS, merged, summary

_DOCS = {
    "lookup_tokens": "Prompt tokens the LMCache connector looked up in the LMCache server.",
    "hit_tokens": "Prompt tokens the LMCache server had cached (lookup hits).",
    "load_tokens": "Tokens whose KV the LMCache connector loaded into vLLM's blocks.",
    "load_bytes": "KV bytes loaded from LMCache (all ranks).",
    "load_seconds": "Seconds spent loading KV from LMCache (summed over ranks).",
    "failed_loads": "Loads from LMCache that failed (vLLM recomputed their blocks).",
    "store_tokens": "Tokens whose KV the LMCache connector stored into LMCache.",
    "store_bytes": "KV bytes stored into LMCache (all ranks).",
    "store_seconds": "Seconds spent storing KV into LMCache (summed over ranks).",
    "failed_stores": "Stores into LMCache that failed (skipped; the request is unaffected).",
}


@dataclass
class LMCacheConnectorStats(KVConnectorStats):  # type: ignore[misc]
    """Counts since vLLM last took them, ``data`` as `stats.Tally.take` gives them."""

    def reset(self) -> None:
        self.data: dict[str, Any] = {}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        self.data = merged(self.data, other.data)
        return self

    def reduce(self) -> dict[str, int | float]:
        return summary(self.data)

    def is_empty(self) -> bool:
        return not any(self.data.get(name, 0) for name in FIELDS)


class LMCachePromMetrics(KVConnectorPromMetrics):  # type: ignore[misc]
    """One counter per field, ``vllm:lmcache_<field>`` (``_total`` in the exposition),
    labelled per engine as vLLM labels its own."""

    def __init__(
        self,
        vllm_config: Any,
        metric_types: dict[Any, Any],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._counters: dict[tuple[int, str], Any] = {}
        for name in FIELDS:
            counter = self._counter_cls(
                name=f"vllm:lmcache_{name}", documentation=_DOCS[name], labelnames=labelnames
            )
            for engine, values in per_engine_labelvalues.items():
                self._counters[(engine, name)] = counter.labels(*values)

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for name in FIELDS:
            value = transfer_stats_data.get(name, 0)
            counter = self._counters.get((engine_idx, name))
            if value and counter is not None:
                counter.inc(value)


class LMCacheKVEvents(KVConnectorKVEvents):  # type: ignore[misc]
    """The ranks' finished-store events of one step, as vLLM gathers them; the
    scheduler (`kv_events.EventTally`) decides what is complete."""

    def __init__(self, events: list[Any], workers: int = 1) -> None:
        self._events = list(events)
        self._workers = workers

    def add_events(self, events: list[KVCacheEvent]) -> None:
        self._events.extend(events)

    def aggregate(self) -> LMCacheKVEvents:
        return self

    def increment_workers(self, count: int = 1) -> None:
        self._workers += count

    def get_all_events(self) -> list[Any]:
        return list(self._events)

    def get_number_of_workers(self) -> int:
        return self._workers

    def clear_events(self) -> None:
        self._events = []
