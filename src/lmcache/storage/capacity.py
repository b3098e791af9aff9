"""A byte budget over keyed objects, evicting by an `EvictionPolicy` (the L1's policies).

The container is generic and the policy is a priority function, as in the L1: the L2
adapters with a capacity (`fs`, `memory`) keep their objects' sizes here and ask it which
to drop. Order is lazy, as in the L1: one heap entry per object, pushed with the priority
it had then; a stale entry (the object was used since) goes back in at its current
priority instead of being evicted, which is exact because priorities never drop.

    put(key, n) ─> stats (created, last_access, hits) ─> heap (priority, seq, key)
    touch(key)  ─> stats only (no heap push: hits are the hot path)
    over budget ─> pop the smallest current priority ─> evicted (key, n)

Not thread-safe: each adapter calls it under its own lock.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from lmcache.storage.eviction import AccessStats, EvictionPolicy

K = TypeVar("K", bound=Hashable)


@dataclass(slots=True)
class _Entry:
    nbytes: int
    stats: AccessStats
    seq: int  # the sequence number of its one live heap entry


class CapacityIndex(Generic[K]):
    def __init__(self, policy: EvictionPolicy, capacity_bytes: int | None) -> None:
        self.policy = policy
        self.capacity_bytes = capacity_bytes  # None: unbounded (nothing is ever evicted)
        self.bytes = 0
        self._entries: dict[K, _Entry] = {}
        self._heap: list[tuple[tuple[int, ...], int, K]] = []
        self._clock = itertools.count(1)
        self._seq = itertools.count(1)

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
        entry = _Entry(nbytes, AccessStats(now, now), 0)
        self._entries[key] = entry
        self.bytes += nbytes
        self._push(key, entry)
        return self._evict_over(keep=key)

    def touch(self, key: K) -> None:
        """A hit: the policy sees one more access."""
        entry = self._entries.get(key)
        if entry is not None:
            entry.stats.last_access = next(self._clock)
            entry.stats.hits += 1

    def pop(self, key: K) -> int | None:
        """Forget ``key``; returns its size (None if unknown). Its heap entry goes stale."""
        entry = self._entries.pop(key, None)
        if entry is None:
            return None
        self.bytes -= entry.nbytes
        return entry.nbytes

    def clear(self) -> list[tuple[K, int]]:
        gone = [(k, e.nbytes) for k, e in self._entries.items()]
        self._entries.clear()
        self._heap.clear()
        self.bytes = 0
        return gone

    def _push(self, key: K, entry: _Entry) -> None:
        entry.seq = seq = next(self._seq)
        heapq.heappush(self._heap, (self.policy.priority(entry.stats), seq, key))

    def _evict_over(self, keep: K) -> list[tuple[K, int]]:
        evicted: list[tuple[K, int]] = []
        held: list[tuple[tuple[int, ...], int, K]] = []
        budget = self.capacity_bytes
        while budget is not None and self.bytes > budget and self._heap:
            priority, seq, key = heapq.heappop(self._heap)
            entry = self._entries.get(key)
            if entry is None or entry.seq != seq:
                continue  # stale: the object left or was re-added since
            if key == keep and len(self._entries) > 1:
                held.append((priority, seq, key))  # the newcomer stays if anything else can go
                continue
            if priority != self.policy.priority(entry.stats):
                self._push(key, entry)  # used since it was pushed: back in at its priority
                continue
            del self._entries[key]
            self.bytes -= entry.nbytes
            evicted.append((key, entry.nbytes))
        for item in held:
            heapq.heappush(self._heap, item)
        return evicted
