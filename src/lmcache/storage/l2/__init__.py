"""L2 tiers: where chunks evicted from (or copied out of) L1 live on, behind one interface.

    make_adapter({"type": ...}) ──> L2Adapter
                                     ├── MemoryL2   dict in this process (tests)
                                     ├── FsL2       one file per object, capacity by policy
                                     └── RedisL2    Redis / Valkey / Redis Cluster, parts + meta

Every stored object carries a header with its length and checksum (`format`), so
each adapter can tell a whole object from a torn, truncated or corrupted one, and
answers a miss instead of wrong bytes.

Configs (one JSON object per ``--l2-adapter``)::

    {"type": "fs", "path": "/data/kv", "max_capacity_gb": 500, "eviction_policy": "LRU"}
    {"type": "redis", "url": "redis://host:6379/0"}   (optional: part_mb, timeout_s,
                                                      retries, key_prefix, cluster)
    {"type": "memory", "max_capacity_gb": 1}            (optional: eviction_policy)

Upstream LMCache's shapes (fs ``base_path``, ``resp``, ``valkey``) are rewritten into
these first (`lmcache.storage.l2.upstream`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from lmcache.errors import ConfigError
from lmcache.storage.l2.base import L2Adapter, L2Error, config_error
from lmcache.storage.l2.upstream import from_upstream

__all__ = ["L2Adapter", "L2Error", "make_adapter"]


def _fs(c: Mapping[str, Any]) -> L2Adapter:
    from lmcache.storage.l2.fs import FsL2

    return FsL2(_string(c, "fs", "path"), c.get("max_capacity_gb"), c.get("eviction_policy", "LRU"))


def _memory(c: Mapping[str, Any]) -> L2Adapter:
    from lmcache.storage.l2.memory import MemoryL2

    return MemoryL2(
        c.get("max_capacity_gb"), _string(c, "memory", "name", "memory"),
        c.get("eviction_policy", "LRU"),
    )  # fmt: skip


def _redis(c: Mapping[str, Any]) -> L2Adapter:
    from lmcache.storage.l2.redis import RedisL2

    # Only the keys given are passed: the defaults are `RedisL2`'s, written there once.
    options: dict[str, Any] = {k: c[k] for k in ("part_mb", "timeout_s", "retries") if k in c}
    if "cluster" in c:
        if not isinstance(c["cluster"], bool):
            raise config_error("redis", f"'cluster' must be true or false, got {c['cluster']!r}")
        options["cluster"] = c["cluster"]
    url = _string(c, "redis", "url")
    if "key_prefix" in c:
        options["key_prefix"] = _string(c, "redis", "key_prefix")
    return RedisL2(url, **options)


# type -> (builder, the keys it takes besides "type")
_TYPES: dict[str, tuple[Callable[[Mapping[str, Any]], L2Adapter], frozenset[str]]] = {
    "fs": (_fs, frozenset({"path", "max_capacity_gb", "eviction_policy"})),
    "memory": (_memory, frozenset({"max_capacity_gb", "name", "eviction_policy"})),
    "redis": (
        _redis,
        frozenset({"url", "part_mb", "timeout_s", "retries", "key_prefix", "cluster"}),
    ),
}


def make_adapter(config: Mapping[str, Any]) -> L2Adapter:
    """Build an adapter from its config; any invalid field raises `ConfigError` naming it."""
    if not isinstance(config, Mapping):
        raise ConfigError(f"l2 adapter: expected a JSON object, got {type(config).__name__}")
    config = from_upstream(config)  # upstream LMCache's shapes (fs base_path, resp, valkey)
    known = ", ".join(sorted(_TYPES)) + " (or upstream's resp, valkey)"
    kind = config.get("type")
    if kind is None:
        raise ConfigError(f"l2 adapter: 'type' is required (one of {known})")
    if not isinstance(kind, str) or kind not in _TYPES:
        raise ConfigError(f"l2 adapter: 'type' {kind!r} is unknown; known types: {known}")
    build, fields = _TYPES[kind]
    unknown = sorted(set(config) - fields - {"type"})
    if unknown:
        raise config_error(
            kind,
            f"unknown key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(sorted(fields))}",
        )
    return build(config)


def _string(c: Mapping[str, Any], kind: str, field: str, default: str | None = None) -> str:
    value = c.get(field, default)
    if value is None or value == "":
        raise config_error(kind, f"{field!r} is required")
    if not isinstance(value, str):
        raise config_error(kind, f"{field!r} must be a string, got {value!r}")
    return value
