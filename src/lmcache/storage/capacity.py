"""A byte budget over keyed objects, evicting by an `EvictionPolicy` (the L1's policies).

The bounded L2 adapters (`fs`, `memory`) keep their objects' sizes here and ask it which
to drop; the order is the policy's (``"eviction_policy"``: LRU, LFU, FIFO or ARC), the
same implementations as the L1's, through the same interface:

    put(key, n) ─> stats (created, last_access, hits) ─> policy.on_insert
    touch(key)  ─> stats; policy.on_access (for policies that order by access themselves)
    over budget ─> policy.victims() ─> evicted (key, n)

Not thread-safe: each adapter calls it under its own lock.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Iterator
from contextlib import closing
from dataclasses import dataclass
from typing import Generic, TypeVar

from lmcache.storage.eviction import AccessStats, EvictionPolicy

K = TypeVar("K", bound=Hashable)


@dataclass(slots=True)
class _Entry:
    nbytes: int
    stats: AccessStats


class CapacityIndex(Generic[K]):
    def __init__(self, policy: EvictionPolicy[K], capacity_bytes: int | None) -> None:
        self.policy = policy
        self.capacity_bytes = capacity_bytes  # None: unbounded (nothing is ever evicted)
        self.bytes = 0
        self._entries: dict[K, _Entry] = {}
        self._clock = itertools.count(1)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[K]:
        return iter(list(self._entries))

    def put(self, key: K, nbytes: int) -> list[tuple[K, int]]:
        """Add (or replace) ``key`` with ``nbytes``; returns what had to go to stay within
        the budget, least valuable first (the key itself never, unless it alone is over)."""
        self.pop(key)
        now = next(self._clock)
        entry = _Entry(nbytes, AccessStats(now, now))
        self._entries[key] = entry
        self.bytes += nbytes
        self.policy.on_insert(key, entry.stats)
        return self._evict_over(keep=key)

    def touch(self, key: K) -> None:
        """A hit: the policy sees one more access."""
        entry = self._entries.get(key)
        if entry is not None:
            entry.stats.last_access = next(self._clock)
            entry.stats.hits += 1
            self.policy.on_access(key)

    def pop(self, key: K) -> int | None:
        """Forget ``key``; returns its size (None if unknown)."""
        entry = self._entries.pop(key, None)
        if entry is None:
            return None
        self.policy.on_remove(key)
        self.bytes -= entry.nbytes
        return entry.nbytes

    def clear(self) -> list[tuple[K, int]]:
        gone = [(k, e.nbytes) for k, e in self._entries.items()]
        self._entries.clear()
        self.policy.clear()
        self.bytes = 0
        return gone

    def _evict_over(self, keep: K) -> list[tuple[K, int]]:
        evicted: list[tuple[K, int]] = []
        budget = self.capacity_bytes
        if budget is None or self.bytes <= budget:
            return evicted
        with closing(self.policy.victims()) as victims:
            for key in victims:
                if key == keep and len(self._entries) > 1:
                    continue  # the newcomer stays if anything else can go
                evicted.append(self._evict(key))
                if self.bytes <= budget:
                    break
        if self.bytes > budget and list(self._entries) == [keep]:
            evicted.append(self._evict(keep))  # alone over the budget
        return evicted

    def _evict(self, key: K) -> tuple[K, int]:
        entry = self._entries.pop(key)
        self.policy.on_remove(key, evicted=True)
        self.bytes -= entry.nbytes
        return key, entry.nbytes
