"""Eviction policies (``--eviction-policy``, and an L2 adapter's ``"eviction_policy"``).

    name          what goes first                                  module
    LRU           least recently used                              heap (priority function)
    LFU           least frequently used, LRU among equals          heap
    FIFO          oldest insertion, access does not matter          heap
    ARC           adaptive: T1 (seen once) vs T2 (seen twice+)     arc
    IsolatedLRU   the salt's own LRU; per-salt quotas (/quota)      isolated
    noop          nothing: the cache never evicts                   heap (Noop)

Every policy implements one interface (`base.EvictionPolicy`) and is tested by one
contract suite (tests/test_eviction_contract.py) against every cache that uses it.
Names are case-insensitive. L2 adapters take the policies that need no salt and do evict
(`L2_POLICIES`).
"""

from __future__ import annotations

from typing import Any

from lmcache.storage.eviction.arc import ARC
from lmcache.storage.eviction.base import AccessStats, EvictionPolicy
from lmcache.storage.eviction.heap import HeapPolicy, Noop, fifo, lfu, lru
from lmcache.storage.eviction.isolated import IsolatedLRU

POLICIES = ("LRU", "LFU", "FIFO", "ARC", "IsolatedLRU", "noop")
L2_POLICIES = ("LRU", "LFU", "FIFO", "ARC")
_BY_KEY = {n.upper(): n for n in POLICIES}


def canonical_name(name: str, choices: tuple[str, ...] = POLICIES) -> str:
    """``name`` as spelled in `POLICIES` (case-insensitive); ValueError names the choices."""
    found = _BY_KEY.get(name.upper())
    if found is None or found not in choices:
        raise ValueError(f"unknown eviction policy {name!r}; choose one of {', '.join(choices)}")
    return found


def make_policy(
    name: str, *, default_limit: int | None = None, choices: tuple[str, ...] = POLICIES
) -> EvictionPolicy[Any]:
    """A fresh policy; ``default_limit``: IsolatedLRU's quota for a salt without one."""
    found = canonical_name(name, choices)
    if found == "ARC":
        return ARC()
    if found == "IsolatedLRU":
        return IsolatedLRU(default_limit)
    if found == "noop":
        return Noop()
    return HeapPolicy(found, {"LRU": lru, "LFU": lfu, "FIFO": fifo}[found])


__all__ = [
    "ARC",
    "L2_POLICIES",
    "POLICIES",
    "AccessStats",
    "EvictionPolicy",
    "HeapPolicy",
    "IsolatedLRU",
    "Noop",
    "canonical_name",
    "make_policy",
]  # fmt: skip
