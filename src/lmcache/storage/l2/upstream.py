"""Upstream LMCache's ``--l2-adapter`` JSON shapes, rewritten into ours.

    {"type": "fs", "base_path": "/data/kv"}                   -> {"type": "fs", "path": ...}
    {"type": "resp", "host": "h", "port": 6379,               -> {"type": "redis",
     "username": "u", "password": "p"}                            "url": "redis://u:p@h:6379/0"}
    {"type": "valkey", "startup_nodes": "h1:6379,h2:6379",    -> {"type": "redis", "url":
     "cluster_mode": true, "tls_enable": true, ...}               "rediss://h1:6379,h2:6379",
                                                                  "cluster": true}

A key upstream has and we cannot honour is refused with a message naming it (the same
`ConfigError` as every other bad config: the server exits 1 at start), never ignored.
Credentials end up in the URL, which `/status`, `/config` and the log mask.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from lmcache.storage.l2.base import config_error

# Keys accepted with no effect, and why (README, "Upstream compatibility").
_NO_EFFECT = {"num_workers"}  # our adapter pipelines on its own connections


def from_upstream(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """``config`` in our shape (unchanged when it is ours already)."""
    kind = config.get("type")
    if kind == "fs" and "base_path" in config:
        return _fs(config)
    if kind == "resp":
        return _resp(config)
    if kind == "valkey":
        return _valkey(config)
    return config


def _fs(c: Mapping[str, Any]) -> dict[str, Any]:
    if "path" in c:
        raise config_error("fs", "give 'path' or upstream's 'base_path', not both")
    for key in ("relative_tmp_dir", "read_ahead_size", "use_odirect"):
        if key in c:
            raise config_error("fs", f"{key!r} is not supported by this implementation")
    out = {k: v for k, v in c.items() if k != "base_path"}
    out["path"] = c["base_path"]
    return out


def _resp(c: Mapping[str, Any]) -> dict[str, Any]:
    _only(c, "resp", {"host", "port", "username", "password", "max_capacity_gb"})
    host = c.get("host")
    if not isinstance(host, str) or not host:
        raise config_error("resp", "'host' is required (a non-empty string)")
    port = c.get("port")
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise config_error("resp", f"'port' must be an integer in 1..65535, got {port!r}")
    _no_capacity(c, "resp")
    url = "redis://" + _userinfo(c, "resp") + _hostport(host, port) + "/0"
    return {"type": "redis", "url": url}


def _valkey(c: Mapping[str, Any]) -> dict[str, Any]:
    allowed = {
        "startup_nodes", "cluster_mode", "username", "password", "key_prefix", "tls_enable",
        "database_id", "request_timeout", "connection_timeout", "max_capacity_gb",
    }  # fmt: skip
    _only(c, "valkey", allowed)
    nodes = _nodes(c.get("startup_nodes"))
    cluster = _bool(c, "valkey", "cluster_mode")
    tls = _bool(c, "valkey", "tls_enable")
    db = c.get("database_id")
    if db is not None and (not isinstance(db, int) or isinstance(db, bool) or db < 0):
        raise config_error("valkey", f"'database_id' must be a non-negative integer, got {db!r}")
    _no_capacity(c, "valkey")
    # Like upstream: without cluster mode the first node is the server; in cluster mode
    # every node is a seed the rest of the cluster is discovered from (tried in turn).
    path = "" if cluster else f"/{db or 0}"
    hosts = ",".join(_hostport(h, p) for h, p in (nodes if cluster else nodes[:1]))
    url = ("rediss://" if tls else "redis://") + _userinfo(c, "valkey") + hosts
    out: dict[str, Any] = {"type": "redis", "url": url + path, "cluster": cluster}
    timeouts = [c[k] for k in ("request_timeout", "connection_timeout") if k in c]
    for t in timeouts:
        if not isinstance(t, int | float) or isinstance(t, bool) or t <= 0:
            raise config_error("valkey", f"timeouts must be positive numbers, got {t!r}")
    if timeouts:
        out["timeout_s"] = float(max(timeouts))  # ours is one timeout for both
    if "key_prefix" in c:
        out["key_prefix"] = c["key_prefix"]
    return out


def _only(c: Mapping[str, Any], kind: str, allowed: set[str]) -> None:
    unknown = sorted(set(c) - allowed - _NO_EFFECT - {"type"})
    if unknown:
        raise config_error(
            kind,
            f"{', '.join(map(repr, unknown))} not supported by this implementation; "
            f"allowed: {', '.join(sorted(allowed | _NO_EFFECT))}",
        )


def _bool(c: Mapping[str, Any], kind: str, key: str) -> bool:
    value = c.get(key, False)
    if not isinstance(value, bool):
        raise config_error(kind, f"{key!r} must be true or false, got {value!r}")
    return value


def _no_capacity(c: Mapping[str, Any], kind: str) -> None:
    cap = c.get("max_capacity_gb", 0)
    if cap not in (0, None):
        raise config_error(
            kind, "'max_capacity_gb' is not supported for Redis here: bound it with Redis's "
            "own maxmemory and an eviction policy",
        )  # fmt: skip


def _userinfo(c: Mapping[str, Any], kind: str) -> str:
    user, password = c.get("username", ""), c.get("password", "")
    for key, value in (("username", user), ("password", password)):
        if not isinstance(value, str):
            raise config_error(kind, f"{key!r} must be a string")
    if not user and not password:
        return ""  # LMCACHE_REDIS_USERNAME / _PASSWORD still apply
    return f"{quote(user, safe='')}:{quote(password, safe='')}@"


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def _nodes(raw: object) -> list[tuple[str, int]]:
    if not isinstance(raw, str) or not raw.strip():
        raise config_error("valkey", "'startup_nodes' is required: 'host:port[,host:port...]'")
    nodes = []
    for item in filter(None, (part.strip() for part in raw.split(","))):
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise config_error("valkey", f"'startup_nodes' entry must be 'host:port', got {item!r}")
        nodes.append((host.strip("[]"), int(port)))
    if not nodes:
        raise config_error("valkey", "'startup_nodes' is required: 'host:port[,host:port...]'")
    return nodes
