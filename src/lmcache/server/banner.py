"""What `lmcache server` prints once at start, for an operator: where to connect (ZMQ,
HTTP, the dashboard), where L1 lives and how much of it has memory now, the L2 tiers,
which transfer modes which peers may use, eviction and the admin rule. Built from the
same ``/status`` the dashboard reads (so the two never disagree) and logged between
"HTTP frontend on ..." and "LMCache cache server is running...", the quick start's lines,
which stay as they are. Nothing secret: adapter names are masked in ``/status`` already
and the admin token only says "set".

    LMCache INFO: ---- lmcache 0.1.0, instance 6f1c... ----
    LMCache INFO:   ZMQ:        tcp://127.0.0.1:5555 (local engines: ipc:///dev/shm/...)
    LMCache INFO:   HTTP:       http://0.0.0.0:8080 (/healthcheck /status /metrics /docs)
    LMCache INFO:   dashboard:  http://localhost:8080/
    ...
"""

from __future__ import annotations

import os
from typing import Any

from lmcache.settings import ServerSettings
from lmcache.storage.shm_names import shm_dir

GiB = 1 << 30
_ANY_HOST = ("0.0.0.0", "::", "[::]", "")


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def _url_host(host: str) -> str:
    """A host to type into a browser for an HTTP server bound to ``host``."""
    if host in _ANY_HOST:
        return "localhost"
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def banner_lines(settings: ServerSettings, status: dict[str, Any], http_port: int) -> list[str]:
    """The banner, one log line per entry, from the server's ``/status``."""
    s = settings
    l1 = status.get("l1", {})
    capacity, committed = int(l1.get("capacity_bytes", 0)), int(l1.get("committed_bytes", 0))
    where = os.path.join(shm_dir(), str(l1.get("shm_segment") or "?").lstrip("/"))
    if committed < capacity:
        memory = f"{_gib(committed)} of it has memory now, grows as chunks arrive (lazy)"
    else:
        memory = "all of it has memory now (pre-faulted)"
    bound = s.http_host or "0.0.0.0"
    shown = f"[{bound}]" if ":" in bound and not bound.startswith("[") else bound
    metrics = "/metrics" if s.metrics_enabled else "metrics disabled"
    lines = [
        f"---- lmcache {status.get('version', '?')}, instance {status.get('instance_id')} ----",
        f"  ZMQ:        {status.get('zmq_endpoint')} (local engines: "
        f"{status.get('local_endpoint')})",
        f"  HTTP:       http://{shown}:{http_port} (/healthcheck /status {metrics} /docs)",
        f"  dashboard:  http://{_url_host(bound)}:{http_port}/"
        + (" (any address of this host)" if bound in _ANY_HOST else ""),
        f"  L1:         {_gib(capacity)} in {where}: {memory}",
        f"  L2:         {_l2(status.get('l2_adapters', []), s)}",
        f"  transfers:  {_transfers(s)}",
        f"  eviction:   {_eviction(s)}",
        "  admin:      POST/PUT/DELETE from loopback, or with the admin token ("
        + ("set" if s.admin_token is not None else "not set: loopback only")
        + ")",
    ]
    return lines


def _l2(adapters: list[dict[str, Any]], s: ServerSettings) -> str:
    if not adapters:
        return "none (--l2-adapter)"
    names = ", ".join(str(a.get("name", a.get("type", "?"))) for a in adapters)
    return (
        f"{names} (store policy {s.l2_store_policy}, prefetch policy {s.l2_prefetch_policy}, "
        f"queue {s.l2_queue_size})"
    )


def _transfers(s: ServerSettings) -> str:
    local = "local engines (same uid): engine_driven, lmcache_driven, bytes"
    if s.curve_keys_dir:
        remote = f"network peers with a CurveZMQ key from {s.curve_keys_dir}: bytes"
    else:
        remote = "network peers: ping only (no --curve-keys-dir)"
    return f"{local}; {remote}"


def _eviction(s: ServerSettings) -> str:
    if s.eviction_trigger_watermark is None:
        return f"{s.eviction_policy}, on demand (a store that finds L1 full)"
    low = max(0.0, s.eviction_trigger_watermark - s.eviction_ratio)
    return (
        f"{s.eviction_policy}, on demand and from {s.eviction_trigger_watermark:.0%} used "
        f"down to {low:.0%} (checked every {s.eviction_interval_s:g} s)"
    )
