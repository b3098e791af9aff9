"""`RedisL2`: objects in Redis / Valkey (single server or Cluster) via redis-py.

One object = one meta key + its payload cut into parts of ``part_mb`` MiB::

    lmcache:{<key hex>}:m      header (80 B): length, xxh3_64, part size   ── written LAST
    lmcache:{<key hex>}:0      payload[0 : part]
    lmcache:{<key hex>}:1      payload[part : 2*part] ...

    put:  MULTI  GET m, SET 0.., SET m  EXEC            one round trip, atomic
    get:  GET m, then GET 0..n-1 pipelined, each read straight into out (`redis_conn`,
          `resp`); verify. TLS / Cluster: MULTI GET m, GET 0..n-1 EXEC, then copy into out
    exists: EXISTS m per key in one pipeline (one round trip per server)

The ``{key hex}`` hash tag keeps an object in one Cluster slot, so the transactions
work on Cluster too. A reader sees a whole object or none: the transaction is
atomic, and even without it the meta key (what `exists` and readers look at) comes
last. A part that is missing (Redis evicted it under ``maxmemory``) or wrong makes
the object a miss, and the object is deleted. Racing writers of one key can at
worst leave it torn, which reads as a miss; never wrong bytes.

Failures: every socket operation has ``timeout_s``; refused or dropped connections
are retried ``retries`` times with exponential backoff (a restart or failover),
timeouts are not (the budget is spent), so a dead or stalled Redis raises
`L2Error` after about ``timeout_s``. Credentials come from the URL or from
``LMCACHE_REDIS_USERNAME`` / ``LMCACHE_REDIS_PASSWORD`` (`redis_url`) and appear
nowhere else: ``name`` is the URL without them, and error texts are scrubbed.

``stats()`` reports ``objects`` and ``bytes`` as None: Redis may be shared and
counting this prefix would need a scan of the whole keyspace.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError
from redis.retry import Retry

from lmcache.storage.l2.base import Health, L2Error, byte_view, check_key, config_error
from lmcache.storage.l2.format import Header, header_for, unpack_header
from lmcache.storage.l2.redis_cluster import cluster_options, connect_soon
from lmcache.storage.l2.redis_conn import (
    PackingConnection,
    PackingSSLConnection,
    fill_from_parts,
    read_parts_into,
)
from lmcache.storage.l2.redis_url import parse_url
from lmcache.types import ObjectKey

logger = logging.getLogger(__name__)

MiB = 1 << 20
_GLOB = re.compile(r"([*?\[\]\\])")
_BATCH = 1000  # keys per SCAN step and per UNLINK in clear()
_ERRORS = (RedisError, RedisClusterException, OSError)

Client = redis.Redis | RedisCluster


class RedisL2:
    def __init__(
        self,
        url: str,
        part_mb: int = 4,
        timeout_s: float = 2.0,
        retries: int = 2,
        key_prefix: str = "lmcache:",
        *,
        cluster: bool = False,
    ) -> None:
        target = parse_url(url, cluster)
        _check_number("part_mb", part_mb, 1, 512, integer=True)
        _check_number("timeout_s", timeout_s, 0.001, 3600)
        _check_number("retries", retries, 0, 10, integer=True)
        if not isinstance(key_prefix, str) or "{" in key_prefix or "}" in key_prefix:
            raise config_error(
                "redis", f"'key_prefix' must be a string without braces, got {key_prefix!r}"
            )
        self.name = target.name
        self.cluster = target.cluster
        self.part_size = int(part_mb) * MiB
        self.timeout_s = float(timeout_s)
        self.retries = int(retries)
        self.key_prefix = key_prefix
        self._target = target
        self._health = Health(scrub=target.secrets)
        self._client: Client | None = None
        self._client_lock = threading.Lock()
        self._closed = False
        if self.cluster:  # learn every node while the seeds answer (see `redis_cluster`)
            connect_soon(self._connect, self.name)

    def __repr__(self) -> str:
        return f"RedisL2({self.name!r})"

    # ----- connection --------------------------------------------------------------------

    def _connect(self) -> Client:
        """The client, created on first use (a Cluster client connects when created)."""
        client = self._client
        if client is not None:
            return client
        with self._client_lock:
            if self._client is None:
                if self._closed:
                    raise L2Error(f"{self.name}: adapter is closed")
                self._client = self._make_client()
            return self._client

    def _make_client(self) -> Client:
        backoff = ExponentialBackoff(cap=min(0.5, self.timeout_s / 4), base=0.02)
        # The Cluster client retries timeouts too (as failovers): split the budget.
        timeout = self.timeout_s / (self.retries + 1) if self.cluster else self.timeout_s
        options: dict[str, Any] = {
            "username": self._target.username,
            "password": self._target.password,
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "socket_keepalive": True,
            "socket_read_size": 1 << 20,
            "connection_class": PackingSSLConnection if self._target.tls else PackingConnection,
            # Only connection errors are retried: a timeout has already used the budget.
            "retry": Retry(backoff, self.retries, supported_errors=(RedisConnectionError,)),
        }
        if self.cluster:
            return RedisCluster.from_url(
                self._target.url, **options, **cluster_options(self._target)
            )
        return redis.Redis.from_url(self._target.url, **options)

    @contextlib.contextmanager
    def _calling(self, what: str) -> Iterator[Client]:
        """Yield the client; turn any backend failure into `L2Error`, track health."""
        if self._closed:
            raise L2Error(f"{self.name}: adapter is closed")
        try:
            yield self._connect()
        except _ERRORS as exc:
            raise self._health.failed(f"{self.name}: {what}", exc) from exc
        self._health.ok()

    def _keys(self, key: ObjectKey) -> str:
        """The key names' common start, ``<prefix>{<key hex>}:``."""
        return f"{self.key_prefix}{{{key.hex()}}}:"

    # ----- operations --------------------------------------------------------------------

    def put(self, key: ObjectKey, data: memoryview | bytes) -> None:
        check_key(key)
        view = byte_view(data)
        base, part = self._keys(key), self.part_size
        header = header_for(key, view, part)
        with self._calling("put") as client:
            pipe = client.pipeline(transaction=True)
            pipe.get(base + "m")
            for i in range(header.parts):
                pipe.set(base + str(i), view[i * part : (i + 1) * part])
            pipe.set(base + "m", header.pack())
            old = unpack_header(pipe.execute()[0], key)
            if old is not None and old.parts > header.parts:  # a shorter object replaced it
                client.unlink(*(base + str(i) for i in range(header.parts, old.parts)))
        self._health.add("puts")

    def exists(self, keys: Sequence[ObjectKey]) -> list[bool]:
        for key in keys:
            check_key(key)
        if not keys:
            return []
        with self._calling("exists") as client:
            pipe = client.pipeline(transaction=False)
            for key in keys:
                pipe.exists(self._keys(key) + "m")
            return [bool(n) for n in pipe.execute()]

    def get_into(self, key: ObjectKey, out: memoryview) -> bool:
        check_key(key)
        out = byte_view(out)
        base = self._keys(key)
        with self._calling("get") as client:
            if isinstance(client, redis.Redis) and not self._target.tls:
                meta = _bytes_or_none(client.get(base + "m"))
                header = unpack_header(meta, key)
                ok = header is not None and read_parts_into(client, base, header, out)
                if ok is None:  # redis-py's socket is out of reach (logged once)
                    meta, header, ok = self._get_buffered(client, base, key, out)
                elif not ok and meta is not None and client.get(base + "m") != meta:
                    self._health.add("misses")  # a writer replaced it meanwhile: not corrupt
                    return False
            else:
                meta, header, ok = self._get_buffered(client, base, key, out)
            if meta is None:
                self._health.add("misses")
                return False
            if not ok:
                self._discard(client, base, header, len(out))
                self._health.add("corrupted")
                self._health.add("misses")
                return False
        self._health.add("hits")
        return True

    def _get_buffered(
        self, client: Client, base: str, key: ObjectKey, out: memoryview
    ) -> tuple[bytes | None, Header | None, bool]:
        """Meta and parts in one transaction, through redis-py (TLS and Cluster)."""
        meta, parts = self._fetch(client, base, len(out), self.part_size)
        header = unpack_header(meta, key)
        if header is not None and header.part_size != self.part_size and header.part_size:
            # written with another part_mb: fetch its parts (meta must be unchanged)
            meta2, parts = self._fetch(client, base, len(out), header.part_size)
            header = header if meta2 == meta else None
        return meta, header, header is not None and fill_from_parts(out, header, parts)

    def _fetch(
        self, client: Client, base: str, nbytes: int, part_size: int
    ) -> tuple[bytes | None, list[bytes | None]]:
        pipe = client.pipeline(transaction=True)
        pipe.get(base + "m")
        for i in range(-(-nbytes // part_size)):
            pipe.get(base + str(i))
        meta, *parts = pipe.execute()
        return meta, parts

    def _discard(self, client: Client, base: str, header: Header | None, nbytes: int) -> None:
        parts = header.parts if header is not None else -(-nbytes // self.part_size)
        client.unlink(base + "m", *(base + str(i) for i in range(parts)))
        logger.warning("%s: object %s failed verification; deleted", self.name, base)

    def delete(self, key: ObjectKey) -> None:
        check_key(key)
        base = self._keys(key)
        with self._calling("delete") as client:
            pipe = client.pipeline(transaction=True)
            pipe.get(base + "m")
            pipe.unlink(base + "m")
            header = unpack_header(pipe.execute()[0], key)
            if header is not None and header.parts:
                client.unlink(*(base + str(i) for i in range(header.parts)))

    def clear(self) -> int:
        """SCAN for this prefix's keys (exactly ``<prefix>{<96 hex>}:...``) and UNLINK them."""
        pattern = _GLOB.sub(r"\\\1", self.key_prefix) + "{" + "?" * 96 + "}:*"
        removed = 0
        with self._calling("clear") as client:
            batch: list[bytes] = []
            for name in client.scan_iter(match=pattern, count=_BATCH):
                batch.append(name)
                removed += name.endswith(b":m")
                if len(batch) >= _BATCH:
                    client.unlink(*batch)
                    batch.clear()
            if batch:
                client.unlink(*batch)
        return removed

    def stats(self) -> dict[str, Any]:
        return {
            "type": "redis",
            "name": self.name,
            "cluster": self.cluster,
            "objects": None,
            "bytes": None,
            "capacity_bytes": None,
            "part_mb": self.part_size // MiB,
            "timeout_s": self.timeout_s,
            **self._health.snapshot(),
        }

    def close(self) -> None:
        with self._client_lock:
            self._closed = True
            client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(*_ERRORS):
                client.close()


def _bytes_or_none(value: object) -> bytes | None:
    return value if isinstance(value, bytes) else None


def _check_number(
    field: str, value: object, low: float, high: float, integer: bool = False
) -> None:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
        what = "an integer" if integer else "a number"
        raise config_error(
            "redis", f"{field!r} must be {what} in [{low:g}, {high:g}], got {value!r}"
        )
