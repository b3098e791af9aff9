"""Policies that are a priority function over `AccessStats`, behind one lazy heap.

    LRU   (last_access,)          least recently used first
    LFU   (hits, last_access)     least frequently used first, LRU among equals
    FIFO  (created,)              oldest insertion first, access does not matter

The smallest priority goes first. Every tracked handle has exactly one live heap entry,
pushed with its priority then; a read only bumps the stats (the cache does that: a
lookup pins many chunks, and a heap push per pin was most of its cost), so a priority
must never decrease when its object is accessed. A stored priority is then a lower
bound: `victims` pops the smallest entry and, if the object was used since, pushes it
back at its current priority instead of yielding it. The first entry popped whose
priority is current is the true minimum, so the order is exact.

Entries of handles removed without being popped (a delete, a replaced key) stay in the
heap as stale entries, skipped when popped; the heap is rebuilt when they outnumber the
live ones.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, Generic

from lmcache.storage.eviction.base import AccessStats, H

Priority = Callable[[AccessStats], tuple[int, ...]]


def lru(stats: AccessStats) -> tuple[int, ...]:
    return (stats.last_access,)


def lfu(stats: AccessStats) -> tuple[int, ...]:
    return (stats.hits, stats.last_access)


def fifo(stats: AccessStats) -> tuple[int, ...]:
    return (stats.created,)


@dataclass(slots=True)
class _Tracked:
    stats: AccessStats
    seq: int  # the sequence number of its one live heap entry


class HeapPolicy(Generic[H]):
    """An eviction policy from a priority function (`lru`, `lfu`, `fifo`)."""

    needs_access = False

    def __init__(self, name: str, priority: Priority) -> None:
        self.name = name
        self.priority = priority
        self._live: dict[H, _Tracked] = {}
        # (priority when pushed, sequence number, handle): the sequence breaks ties in
        # push order and keeps handles from ever being compared.
        self._heap: list[tuple[tuple[int, ...], int, H]] = []
        self._seq = itertools.count(1)

    def __len__(self) -> int:
        return len(self._live)

    def on_insert(self, h: H, stats: AccessStats, salt: str = "") -> None:
        tracked = self._live[h] = _Tracked(stats, 0)
        self._push(h, tracked)

    def on_access(self, h: H) -> None:
        """Nothing to do: the cache bumped the stats; the heap catches up lazily."""

    def on_remove(self, h: H, evicted: bool = False) -> None:
        self._live.pop(h, None)
        if len(self._heap) > 2 * len(self._live) + 64:
            self._compact()

    def victims(self, salt: str | None = None) -> Generator[H, None, None]:
        held: list[tuple[tuple[int, ...], int, H]] = []  # offered, not removed: put back
        try:
            while self._heap:
                entry = heapq.heappop(self._heap)
                priority, seq, h = entry
                tracked = self._live.get(h)
                if tracked is None or tracked.seq != seq:
                    continue  # stale: removed, or re-inserted since
                if priority != self.priority(tracked.stats):
                    self._push(h, tracked)  # used since it was pushed: back in, current priority
                    continue
                held.append(entry)  # before the yield: the caller may close us there
                yield h
        finally:
            for entry in held:
                tracked = self._live.get(entry[2])
                if tracked is not None and tracked.seq == entry[1]:
                    heapq.heappush(self._heap, entry)  # skipped by the cache (pinned)

    def limit(self, salt: str) -> int | None:
        return None

    def clear(self) -> None:
        self._live.clear()
        self._heap.clear()

    def describe(self) -> dict[str, Any]:
        return {"tracked": len(self._live), "heap_entries": len(self._heap)}

    def _push(self, h: H, tracked: _Tracked) -> None:
        tracked.seq = seq = next(self._seq)
        heapq.heappush(self._heap, (self.priority(tracked.stats), seq, h))

    def _compact(self) -> None:
        self._heap = [e for e in self._heap if (t := self._live.get(e[2])) and t.seq == e[1]]
        heapq.heapify(self._heap)


class Noop(Generic[H]):
    """``noop``: tracks nothing and offers no victim, so the cache never evicts.

    Objects stay until they are cleared or deleted (``POST /clear-cache``, ``POST
    /cache/clear``, ``DELETE /cache/objects``); once the pool is full a store is skipped
    (``no_space``), as when every object is pinned. Upstream uses it for an L1 that is
    only a write buffer in front of L2 (its ``--l2-store-policy skip_l1``, which we do
    not have); here it keeps a working set loaded once (say, shared system prompts)
    from ever being pushed out by other traffic, at the price of caching nothing new
    once L1 is full."""

    name = "noop"
    needs_access = False

    def __len__(self) -> int:
        return 0

    def on_insert(self, h: H, stats: AccessStats, salt: str = "") -> None:
        pass

    def on_access(self, h: H) -> None:
        pass

    def on_remove(self, h: H, evicted: bool = False) -> None:
        pass

    def victims(self, salt: str | None = None) -> Generator[H, None, None]:
        yield from ()

    def limit(self, salt: str) -> int | None:
        return None

    def clear(self) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        return {}
