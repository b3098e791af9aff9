"""What every L2 adapter promises, and the bookkeeping they share.

    server thread ──put/exists/get_into/delete/clear──> L2Adapter ──> dict | files | Redis
                                                            │
                          backend failure (unreachable, timeout, I/O) ──> L2Error
                          corrupt / torn / wrong-size object ──────────> miss (and deleted)

An L2 is a cache: losing an object is always allowed, returning wrong bytes never is.
So a read that cannot be verified is a miss, and a backend that does not answer in
time raises `L2Error` instead of blocking the caller (the server then skips the
adapter for a while). `stats()` never raises and never touches the backend.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, Protocol

from lmcache.errors import ConfigError, LMCacheError
from lmcache.storage.eviction import L2_POLICIES, EvictionPolicy, make_policy
from lmcache.types import ObjectKey

GiB = 1 << 30


class L2Error(LMCacheError):
    """An L2 backend failed: unreachable, timed out, or an I/O error."""


class L2Adapter(Protocol):
    """One L2 tier. Thread-safe: the server calls it from several threads."""

    name: str  # e.g. "fs:/data/kv", "redis://host:6379/0" (never any credentials)

    def put(self, key: ObjectKey, data: memoryview | bytes) -> None:
        """Store ``data`` under ``key`` atomically: readers see the old object or the new one."""
        ...

    def exists(self, keys: Sequence[ObjectKey]) -> list[bool]:
        """Which ``keys`` are stored, in one batched query."""
        ...

    def get_into(self, key: ObjectKey, out: memoryview) -> bool:
        """Fill ``out`` (exactly the object's size) and return True; False is a miss.

        A corrupt, torn or wrong-size object is a miss and is deleted; ``out`` may then
        hold garbage. On a plain miss (nothing stored) ``out`` is not touched.
        """
        ...

    def delete(self, key: ObjectKey) -> None: ...

    def clear(self) -> int:
        """Remove every object this adapter stored (nothing else); return how many."""
        ...

    def stats(self) -> dict[str, Any]:
        """type, name, objects, bytes, capacity_bytes, hits, misses, errors, healthy,
        last_error, and adapter-specific extras. Cheap; never raises."""
        ...

    def close(self) -> None: ...


def config_error(kind: str, message: str) -> ConfigError:
    """``l2 adapter 'fs': 'path' is required`` -- every config message names the field."""
    return ConfigError(f"l2 adapter {kind!r}: {message}")


def policy_for(kind: str, name: object) -> EvictionPolicy[Any]:
    """The eviction policy an adapter's capacity uses (``"eviction_policy"``, as L1's,
    among those that need no cache_salt and do evict: `L2_POLICIES`)."""
    if not isinstance(name, str):
        raise config_error(kind, f"'eviction_policy' must be a string, got {name!r}")
    try:
        return make_policy(name, choices=L2_POLICIES)
    except ValueError as exc:
        raise config_error(kind, f"'eviction_policy': {exc}") from None


def capacity_bytes(kind: str, max_capacity_gb: float | None) -> int | None:
    """GiB (like ``l1_size_gb``) to bytes; None means unbounded."""
    if max_capacity_gb is None:
        return None
    if (
        isinstance(max_capacity_gb, bool)
        or not isinstance(max_capacity_gb, int | float)
        or not max_capacity_gb > 0
    ):
        raise config_error(
            kind, f"'max_capacity_gb' must be a positive number, got {max_capacity_gb!r}"
        )
    return max(1, int(max_capacity_gb * GiB))


def check_key(key: ObjectKey) -> None:
    if not isinstance(key, bytes) or len(key) != 48:
        raise ValueError(f"L2 keys are 48-byte ObjectKeys, got {type(key).__name__} {key!r:.40}")


def byte_view(data: memoryview | bytes | bytearray) -> memoryview:
    """A flat unsigned-byte view of ``data`` (numpy arrays' views have other formats)."""
    view = memoryview(data)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


# hits/misses count get_into; corrupted objects count as misses too; rejected = larger
# than the whole capacity, not stored.
COUNTERS = ("hits", "misses", "errors", "puts", "corrupted", "evictions", "rejected")


class Health:
    """Counters and the healthy flag: one lock, so threads never lose an increment.

    ``healthy`` turns False on a backend failure and True again on the next success.
    """

    def __init__(self, scrub: tuple[str, ...] = ()) -> None:
        self._lock = threading.Lock()
        self._scrub = tuple(s for s in scrub if s)
        self.counts = dict.fromkeys(COUNTERS, 0)
        self.healthy = True
        self.last_error: str | None = None

    def add(self, counter: str, n: int = 1) -> None:
        with self._lock:
            self.counts[counter] = self.counts.get(counter, 0) + n

    def ok(self) -> None:
        self.healthy = True

    def failed(self, what: str, exc: BaseException) -> L2Error:
        """Record a backend failure; return the `L2Error` to raise (credentials scrubbed)."""
        message = self.scrub(f"{what}: {type(exc).__name__}: {exc}")
        with self._lock:
            self.counts["errors"] += 1
            self.healthy = False
            self.last_error = message
        return L2Error(message)

    def scrub(self, text: str) -> str:
        for secret in self._scrub:
            text = text.replace(secret, "***")
        return text

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {**self.counts, "healthy": self.healthy, "last_error": self.last_error}
