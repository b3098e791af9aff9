"""A Redis / Valkey URL and its credentials, parsed once for `RedisL2`.

    redis://user:pass@host:6379/0        valkey://host       rediss://host (TLS)
    redis+cluster://host:7000            (any scheme +cluster: a Redis Cluster)
    redis+cluster://h1:7000,h2:7000      (Cluster: several seeds, tried in turn)

Credentials come from the URL or from ``LMCACHE_REDIS_USERNAME`` /
``LMCACHE_REDIS_PASSWORD``, and leave this module only in `RedisTarget`'s
``username`` / ``password`` (for the client) and ``secrets`` (for scrubbing error
texts): ``url`` and ``name`` never hold them, so they can be logged and shown in
``/status``. Kept apart from the adapter so that the code that handles credentials is
small enough to check at a glance.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import SplitResult, parse_qs, unquote, urlsplit, urlunsplit

from lmcache.storage.l2.base import config_error

_SCHEMES = {"redis": "redis", "rediss": "rediss", "valkey": "redis", "valkeys": "rediss"}
USERNAME_ENV = "LMCACHE_REDIS_USERNAME"
PASSWORD_ENV = "LMCACHE_REDIS_PASSWORD"


@dataclass(frozen=True)
class RedisTarget:
    """A parsed URL: where to connect (no credentials in ``url``) and with what."""

    url: str
    name: str
    cluster: bool
    tls: bool
    username: str | None
    password: str | None
    secrets: tuple[str, ...]
    seeds: tuple[tuple[str, int], ...] = ()
    """Cluster only: the URL's other nodes (``host:port`` after the first), startup nodes
    besides ``url``'s. A client that has never connected knows no more than these: with a
    single seed that is down, it cannot find the cluster at all."""


def parse_url(url: str, cluster: bool = False) -> RedisTarget:
    """Check ``url`` and split it into a credential-free client URL, a display name and
    the credentials; every problem is a `ConfigError` that names the ``url`` field."""
    if not url or not isinstance(url, str):
        raise config_error("redis", "'url' is required")
    try:
        parts, seeds = _split_seeds(urlsplit(url))
        port = parts.port or 6379
    except ValueError:
        raise config_error("redis", "'url' is not a valid URL") from None
    scheme = parts.scheme.lower()
    base, plus, variant = scheme.partition("+")
    if base not in _SCHEMES or (plus and variant != "cluster"):
        raise config_error(
            "redis",
            f"'url' scheme must be redis://, rediss://, valkey:// or valkeys:// "
            f"(or one of them +cluster, e.g. redis+cluster://), got {scheme + '://'!r}",
        )
    cluster = cluster or variant == "cluster"
    if seeds and not cluster:
        raise config_error("redis", "'url' may name several hosts only for a Redis Cluster")
    if not parts.hostname:
        raise config_error("redis", "'url' has no host")
    host = _bracket(parts.hostname)
    path = parts.path.strip("/")
    if not path.isdigit() and path:
        raise config_error("redis", f"'url' path must be a database number, got {path!r}")
    db = int(path or 0)
    if cluster and db != 0:
        raise config_error("redis", "'url' database must be 0 with Redis Cluster")
    query = parse_qs(parts.query)
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    username = username or os.environ.get(USERNAME_ENV) or None
    password = password or os.environ.get(PASSWORD_ENV) or None
    # Always redis://: TLS is chosen by connection class (see RedisL2._make_client).
    client_url = f"redis://{host}:{port}" + ("" if cluster else f"/{db}")
    if parts.query:
        client_url += f"?{parts.query}"
    others = "".join(f",{_bracket(h)}:{p}" for h, p in seeds)
    return RedisTarget(
        url=client_url,
        name=f"{scheme}://{host}:{port}{others}/{db}",
        cluster=cluster,
        tls=_SCHEMES[base] == "rediss",
        username=username,
        password=password,
        secrets=tuple(s for s in (password, *query.get("password", [])) if s),
        seeds=seeds,
    )


def _split_seeds(parts: SplitResult) -> tuple[SplitResult, tuple[tuple[str, int], ...]]:
    """``scheme://user@h1:p1,h2:p2/...`` -> the URL with ``h1:p1`` only, and the other
    ``(host, port)`` pairs (ValueError for a bad one)."""
    userinfo, at, hosts = parts.netloc.rpartition("@")
    first, *rest = hosts.split(",")
    seeds = []
    for spec in rest:
        other = urlsplit("//" + spec)
        if not other.hostname or other.username or other.password:
            raise ValueError(spec)
        seeds.append((other.hostname, other.port or 6379))
    if not rest:
        return parts, ()
    return urlsplit(urlunsplit(parts._replace(netloc=userinfo + at + first))), tuple(seeds)


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host
