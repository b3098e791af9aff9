#!/usr/bin/env python3
"""Writes lmcache-dashboard.json, our Grafana dashboard over this server's own metric names
(``lmcache_*``; README "Metrics"). The JSON is generated so that the panels stay short and
uniform here; edit this script, run it, and commit both:

    python deploy/grafana/generate.py            # rewrites deploy/grafana/lmcache-dashboard.json
    python deploy/grafana/generate.py --check    # exit 1 when the JSON is not what it writes

Panels use a ``$datasource`` (Prometheus) and an ``$instance`` variable (the servers' scrape
targets, from ``lmcache_build_info``). Standard library only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).with_name("lmcache-dashboard.json")
SEL = 'instance=~"$instance"'
DS = {"type": "prometheus", "uid": "${datasource}"}
WIDTH = 24


def rate(name: str, by: str = "instance", window: str = "$__rate_interval") -> str:
    return f"sum by ({by}) (rate({name}{{{SEL}}}[{window}]))"


HIT_RATE = (
    f"{rate('lmcache_lookup_hit_tokens_total')} / {rate('lmcache_lookup_requested_tokens_total')}"
)


class Layout:
    """Places panels left to right, row by row, and numbers them."""

    def __init__(self) -> None:
        self.panels: list[dict[str, Any]] = []
        self.x = self.y = self.row_h = 0

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append(self._panel("row", title, 24, 1) | {"collapsed": False, "panels": []})
        self.y += 1

    def add(self, kind: str, title: str, size: tuple[int, int], targets: list[tuple[str, str]],
            unit: str, **extra: Any) -> None:  # fmt: skip
        w, h = size
        if self.x + w > WIDTH:
            self._newline()
        panel = self._panel(kind, title, w, h)
        panel["datasource"] = DS
        panel["targets"] = [
            {"refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend, "datasource": DS}
            for i, (expr, legend) in enumerate(targets)
        ]
        panel["fieldConfig"] = {"defaults": {"unit": unit, **extra.pop("defaults", {})},
                                "overrides": []}  # fmt: skip
        panel.update(extra)
        self.panels.append(panel)
        self.x += w
        self.row_h = max(self.row_h, h)

    def _panel(self, kind: str, title: str, w: int, h: int) -> dict[str, Any]:
        return {"id": len(self.panels) + 1, "type": kind, "title": title,
                "gridPos": {"x": self.x, "y": self.y, "w": w, "h": h}}  # fmt: skip

    def _newline(self) -> None:
        if self.x:
            self.y += self.row_h
        self.x = self.row_h = 0


def dashboard() -> dict[str, Any]:
    p = Layout()
    stat = {"options": {"reduceOptions": {"calcs": ["lastNotNull"]}, "colorMode": "value"}}
    pct = {"min": 0, "max": 1}
    p.row("Overview")
    p.add("stat", "Servers up", (4, 4), [(f"sum(up{{{SEL}}})", "up")], "none", **stat)
    p.add("stat", "Hit rate (tokens, all servers)", (4, 4),
          [(f"sum(rate(lmcache_lookup_hit_tokens_total{{{SEL}}}[$__rate_interval])) / "
            f"sum(rate(lmcache_lookup_requested_tokens_total{{{SEL}}}[$__rate_interval]))",
            "hit rate")], "percentunit", defaults=pct, **stat)  # fmt: skip
    p.add("stat", "L1 used", (4, 4), [(f"sum(lmcache_l1_used_bytes{{{SEL}}}) / "
          f"sum(lmcache_l1_capacity_bytes{{{SEL}}})", "used")], "percentunit", defaults=pct,
          **stat)  # fmt: skip
    p.add("stat", "Engines registered", (4, 4), [(f"sum(lmcache_engines{{{SEL}}})", "engines")],
          "none", **stat)  # fmt: skip
    p.add("stat", "L2 tiers down", (4, 4), [(f"count(lmcache_l2_up{{{SEL}}} == 0) or vector(0)",
          "down")], "none", **stat)  # fmt: skip
    p.add("stat", "Stores cut short (1h)", (4, 4),
          [(f"sum(increase(lmcache_store_no_space_total{{{SEL}}}[1h]))", "no space")], "none",
          **stat)  # fmt: skip

    p.row("Cache effect")
    p.add("timeseries", "Hit rate by server", (12, 8), [(HIT_RATE, "{{instance}}")],
          "percentunit", defaults=pct)  # fmt: skip
    p.add("timeseries", "Hit tokens by tier (L1, or loaded from L2)", (12, 8),
          [(rate("lmcache_lookup_hit_tier_tokens_total", "tier"), "{{tier}}"),
           (rate("lmcache_lookup_requested_tokens_total", "instance"), "asked {{instance}}")],
          "short")  # fmt: skip
    p.add("timeseries", "Tokens stored and retrieved per second", (12, 8),
          [(rate("lmcache_stored_tokens_total"), "stored {{instance}}"),
           (rate("lmcache_retrieved_tokens_total"), "retrieved {{instance}}")],
          "short")  # fmt: skip
    p.add("timeseries", "Bytes stored and retrieved per second", (12, 8),
          [(rate("lmcache_stored_bytes_total"), "stored {{instance}}"),
           (rate("lmcache_retrieved_bytes_total"), "retrieved {{instance}}")], "Bps")  # fmt: skip

    p.row("L1 memory")
    p.add("timeseries", "L1 bytes: used, committed (lazy pool), capacity", (12, 8),
          [(f"lmcache_l1_used_bytes{{{SEL}}}", "used {{instance}}"),
           (f"lmcache_l1_committed_bytes{{{SEL}}}", "committed {{instance}}"),
           (f"lmcache_l1_capacity_bytes{{{SEL}}}", "capacity {{instance}}")], "bytes")  # fmt: skip
    p.add("timeseries", "L1 objects and locked objects", (12, 8),
          [(f"lmcache_l1_objects{{{SEL}}}", "objects {{instance}}"),
           (f"lmcache_l1_locked_objects{{{SEL}}}", "locked {{instance}}"),
           (f"lmcache_sessions{{{SEL}}}", "open lookups {{instance}}")], "short")  # fmt: skip
    p.add("timeseries", "Evictions and stores cut short per second", (12, 8),
          [(rate("lmcache_l1_evictions_total"), "evicted {{instance}}"),
           (rate("lmcache_store_no_space_total"), "no space {{instance}}")], "short")  # fmt: skip

    p.row("Requests")
    p.add("timeseries", "Requests per second by operation and outcome", (12, 8),
          [(rate("lmcache_requests_total", "op, outcome"), "{{op}} {{outcome}}")],
          "reqps")  # fmt: skip
    for q in ("0.5", "0.99"):
        p.add("timeseries", f"Request duration p{float(q) * 100:g} by operation", (12, 8),
              [(f"histogram_quantile({q}, sum by (op, le) "
                f"(rate(lmcache_request_duration_seconds_bucket{{{SEL}}}[$__rate_interval])))",
                "{{op}}")], "s")  # fmt: skip

    p.row("L2 tiers")
    p.add("timeseries", "Up (1) or down (0)", (8, 8),
          [(f"lmcache_l2_up{{{SEL}}}", "{{adapter}}")], "none",
          defaults={"min": 0, "max": 1})  # fmt: skip
    p.add("timeseries", "Objects", (8, 8), [(f"lmcache_l2_objects{{{SEL}}}", "{{adapter}}")],
          "short")  # fmt: skip
    p.add("timeseries", "Bytes", (8, 8), [(f"lmcache_l2_bytes{{{SEL}}}", "{{adapter}}")], "bytes")
    p.add("timeseries", "Hits, misses and prefetched objects per second", (8, 8),
          [(rate("lmcache_l2_hits_total", "adapter"), "hits {{adapter}}"),
           (rate("lmcache_l2_misses_total", "adapter"), "misses {{adapter}}"),
           (rate("lmcache_l2_prefetched_objects_total", "adapter"), "prefetched {{adapter}}")],
          "short")  # fmt: skip
    p.add("timeseries", "Write queue depth", (8, 8),
          [(f"lmcache_l2_queue_depth{{{SEL}}}", "{{adapter}}")], "short")  # fmt: skip
    p.add("timeseries", "Errors and skipped writes (queue full) per second", (8, 8),
          [(rate("lmcache_l2_errors_total", "adapter"), "errors {{adapter}}"),
           (rate("lmcache_l2_store_skipped_total", "adapter"), "skipped {{adapter}}")],
          "short")  # fmt: skip

    return {
        "title": "LMCache server",
        "uid": "lmcache-server",
        "description": "lmcache server (independent multiprocess-mode implementation): "
        "its own lmcache_* metrics. Generated by deploy/grafana/generate.py.",
        "tags": ["lmcache", "kv-cache"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "timezone": "browser",
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Prometheus",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                },
                {
                    "name": "instance",
                    "label": "Server",
                    "type": "query",
                    "datasource": DS,
                    "query": {"query": "label_values(lmcache_build_info, instance)", "refId": "I"},
                    "definition": "label_values(lmcache_build_info, instance)",
                    "refresh": 2,
                    "includeAll": True,
                    "multi": True,
                    "allValue": ".*",
                    "current": {"text": "All", "value": "$__all"},
                    "hide": 0,
                },
            ]
        },
        "annotations": {"list": []},
        "panels": p.panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is stale: run {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
