"""IsolatedLRU: one LRU per ``cache_salt``, each salt's bytes limited by a quota.

    salt "a"  quota 2 GiB  [a1 a2 a3 ...]   a store of salt "a" over 2 GiB evicts a1 first,
    salt "b"  quota 8 GiB  [b1 b2 ...]      and never an object of "b" (not even when the
    salt ""   quota ... (``_default``)       pool itself is full)

Quotas are set at run time (``PUT /quota/{cache_salt}``); a salt without its own quota
gets ``default_limit`` (``--default-quota-gb``; unset: 0 bytes, as upstream, so its
stores are skipped). The table holds at most `MAX_QUOTAS` salts. Lowering a quota (or
deleting it) makes the cache evict that salt's excess at once (`L1Cache.enforce_limit`).

Besides the per-salt lists, one global LRU over every salt gives the order for evictions
that are not a salt's own (the watermark thread). Salts are tenants' secrets: they never
appear in `describe` (so not in /status) nor in a log line.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Generator
from typing import Any, Generic

from lmcache.storage.eviction.base import AccessStats, H

MAX_QUOTAS = 4096  # salts with a quota of their own
DEFAULT_SALT_NAME = "_default"  # upstream's name for the empty salt in /quota routes


class QuotaTableFull(Exception):
    """A quota for one more salt would exceed `MAX_QUOTAS`."""


class IsolatedLRU(Generic[H]):
    name = "IsolatedLRU"
    needs_access = True

    def __init__(self, default_limit: int | None = None) -> None:
        self.default_limit = default_limit  # bytes for a salt without a quota; None: 0
        self._quotas: dict[str, int] = {}
        self._quota_lock = threading.Lock()  # HTTP threads change quotas; readers copy
        self._salt_of: dict[H, str] = {}
        self._all: OrderedDict[H, None] = OrderedDict()
        self._by_salt: dict[str, OrderedDict[H, None]] = {}

    def __len__(self) -> int:
        return len(self._all)

    # ----- tracking ----------------------------------------------------------------

    def on_insert(self, h: H, stats: AccessStats, salt: str = "") -> None:
        self._salt_of[h] = salt
        self._all[h] = None
        self._by_salt.setdefault(salt, OrderedDict())[h] = None

    def on_access(self, h: H) -> None:
        salt = self._salt_of.get(h)
        if salt is not None:
            self._all.move_to_end(h)
            self._by_salt[salt].move_to_end(h)

    def on_remove(self, h: H, evicted: bool = False) -> None:
        salt = self._salt_of.pop(h, None)
        if salt is None:
            return
        del self._all[h]
        own = self._by_salt[salt]
        del own[h]
        if not own:
            del self._by_salt[salt]  # the table of salts stays as small as the cache

    def victims(self, salt: str | None = None) -> Generator[H, None, None]:
        od = self._all if salt is None else self._by_salt.get(salt)
        passed: set[H] = set()
        while od:
            h = next((k for k in od if k not in passed), None)
            if h is None:
                return
            yield h
            if h in self._salt_of:
                passed.add(h)

    def clear(self) -> None:
        self._salt_of.clear()
        self._all.clear()
        self._by_salt.clear()

    # ----- quotas --------------------------------------------------------------------

    def limit(self, salt: str) -> int | None:
        quota = self._quotas.get(salt)
        if quota is not None:
            return quota
        return self.default_limit if self.default_limit is not None else 0

    def quotas(self) -> dict[str, int]:
        with self._quota_lock:
            return dict(self._quotas)

    def set_quota(self, salt: str, limit_bytes: int) -> None:
        with self._quota_lock:
            if salt not in self._quotas and len(self._quotas) >= MAX_QUOTAS:
                raise QuotaTableFull(f"at most {MAX_QUOTAS} salts may have a quota")
            self._quotas[salt] = limit_bytes

    def delete_quota(self, salt: str) -> bool:
        with self._quota_lock:
            return self._quotas.pop(salt, None) is not None

    def describe(self) -> dict[str, Any]:
        return {
            "salts_with_objects": len(self._by_salt),
            "quotas": len(self._quotas),
            "default_limit_bytes": self.default_limit or 0,
        }
