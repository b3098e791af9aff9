"""Per-``cache_salt`` quotas of IsolatedLRU, as the HTTP ``/quota`` routes see them.

The quotas live in the policy (`lmcache.storage.eviction.IsolatedLRU`); a change applies
at once: lowering or deleting a quota evicts the salt's excess (its own LRU order,
unpinned objects only) before the answer, and the salt's next stores see the new limit.
With any other policy the routes answer 409: quotas would have no effect.
"""

from __future__ import annotations

import logging
from typing import Any

from lmcache.errors import QuotaError
from lmcache.storage.eviction import IsolatedLRU
from lmcache.storage.eviction.isolated import DEFAULT_SALT_NAME, MAX_QUOTAS, QuotaTableFull
from lmcache.storage.l1 import L1Cache

logger = logging.getLogger("lmcache.server")
GiB = 1 << 30


def salt_of(name: str) -> str:
    """The cache_salt a /quota path names (``_default``: requests without a salt)."""
    return "" if name == DEFAULT_SALT_NAME else name


def name_of(salt: str) -> str:
    return DEFAULT_SALT_NAME if salt == "" else salt


class QuotaTable:
    def __init__(self, l1: L1Cache) -> None:
        self.l1 = l1

    def _policy(self) -> IsolatedLRU[Any]:
        policy = self.l1.policy
        if not isinstance(policy, IsolatedLRU):
            raise QuotaError(
                409,
                f"quotas apply only with --eviction-policy IsolatedLRU (this server runs "
                f"{policy.name})",
            )
        return policy

    def _entry(self, salt: str, limit: int) -> dict[str, Any]:
        return {
            "cache_salt": name_of(salt), "limit_gb": limit / GiB,
            "used_gb": self.l1.salt_bytes(salt) / GiB,
        }  # fmt: skip

    def list(self) -> dict[str, Any]:
        policy = self._policy()
        return {
            "policy": policy.name,
            "default_limit_gb": (policy.default_limit or 0) / GiB,
            "max_quotas": MAX_QUOTAS,
            "quotas": [self._entry(s, limit) for s, limit in sorted(policy.quotas().items())],
        }

    def get(self, name: str) -> dict[str, Any]:
        policy, salt = self._policy(), salt_of(name)
        limit = policy.quotas().get(salt)
        if limit is None:
            raise QuotaError(
                404,
                f"no quota for this cache_salt: its limit is the default, "
                f"{(policy.default_limit or 0) / GiB:g} GiB (--default-quota-gb)",
            )
        return self._entry(salt, limit)

    def set(self, name: str, limit_gb: float) -> dict[str, Any]:
        policy, salt = self._policy(), salt_of(name)
        try:
            policy.set_quota(salt, int(limit_gb * GiB))
        except QuotaTableFull as exc:
            raise QuotaError(409, f"{exc}; delete one first") from None
        evicted = self.l1.enforce_limit(salt)
        logger.info("Quota set to %g GiB for a cache_salt (%d objects evicted)", limit_gb, evicted)
        return {**self._entry(salt, int(limit_gb * GiB)), "evicted": evicted}

    def delete(self, name: str) -> dict[str, Any]:
        policy, salt = self._policy(), salt_of(name)
        if not policy.delete_quota(salt):
            raise QuotaError(404, "no quota for this cache_salt")
        evicted = self.l1.enforce_limit(salt)
        logger.info("Quota deleted for a cache_salt (%d objects evicted)", evicted)
        return {"cache_salt": name_of(salt), "deleted": True, "evicted": evicted}
