"""ARC, adaptive replacement (Megiddo & Modha): recency against frequency, self-tuned.

    T1  resident, seen once since it came in        (recency)      ┐ evicted from T1 while
    T2  resident, seen at least twice               (frequency)    ┘ |T1| > p, else from T2
    B1  keys evicted from T1 (ghosts: keys only)    a hit here: p grows (favour recency)
    B2  keys evicted from T2 (ghosts: keys only)    a hit here: p shrinks (favour frequency)

Every list is in LRU order. A key inserted again while it is a ghost goes straight to
T2 and moves the target ``p`` (the share of T1) towards the list that would have kept
it. So a one-off scan only ever churns T1 and never flushes T2: the frequently used
chunks survive it.

Differences from the paper, for a cache of objects of many sizes with pins: ``c`` (the
cache size, in objects) is the most objects ever resident at once, not a fixed page
count; an eviction is asked for room, not for a specific newcomer, so the paper's
``x in B2 and |T1| == p`` tie-break is dropped; a victim the cache skips (pinned) is
passed over and the next one offered, from the other list when this one has none left.
Ghosts are bounded: |T1| + |B1| <= c and all four lists together <= 2c, and never more
than `MAX_GHOSTS` keys.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Generator
from typing import Any, Generic

from lmcache.storage.eviction.base import AccessStats, H

MAX_GHOSTS = 1 << 16  # keys remembered in B1 + B2 at most (a few MB)


class ARC(Generic[H]):
    name = "ARC"
    needs_access = True

    def __init__(self) -> None:
        self._t1: OrderedDict[H, None] = OrderedDict()
        self._t2: OrderedDict[H, None] = OrderedDict()
        self._b1: OrderedDict[H, None] = OrderedDict()
        self._b2: OrderedDict[H, None] = OrderedDict()
        self.p = 0.0  # target size of T1, in objects
        self._c = 0  # the most objects resident at once

    def __len__(self) -> int:
        return len(self._t1) + len(self._t2)

    def on_insert(self, h: H, stats: AccessStats, salt: str = "") -> None:
        b1, b2 = len(self._b1), len(self._b2)
        if h in self._b1:  # evicted for recency too early: give T1 more room
            self.p = min(float(self._c), self.p + max(b2 / b1, 1.0))
            del self._b1[h]
            self._t2[h] = None
        elif h in self._b2:  # evicted for frequency too early: give T2 more room
            self.p = max(0.0, self.p - max(b1 / b2, 1.0))
            del self._b2[h]
            self._t2[h] = None
        else:
            self._t1[h] = None
        self._c = min(max(self._c, len(self)), MAX_GHOSTS)

    def on_access(self, h: H) -> None:
        if h in self._t1:
            del self._t1[h]
            self._t2[h] = None
        elif h in self._t2:
            self._t2.move_to_end(h)

    def on_remove(self, h: H, evicted: bool = False) -> None:
        if h in self._t1:
            del self._t1[h]
            if evicted:
                self._b1[h] = None
        elif h in self._t2:
            del self._t2[h]
            if evicted:
                self._b2[h] = None
        else:
            return
        if evicted:
            self._trim_ghosts()

    def victims(self, salt: str | None = None) -> Generator[H, None, None]:
        passed: set[H] = set()  # offered and skipped by the cache (pinned)
        while True:
            first, second = (self._t1, self._t2) if len(self._t1) > self.p else (self._t2, self._t1)
            h = _oldest(first, passed)
            if h is None:
                h = _oldest(second, passed)
            if h is None:
                return
            yield h
            if h in self._t1 or h in self._t2:
                passed.add(h)

    def limit(self, salt: str) -> int | None:
        return None

    def clear(self) -> None:
        for od in (self._t1, self._t2, self._b1, self._b2):
            od.clear()
        self.p, self._c = 0.0, 0

    def describe(self) -> dict[str, Any]:
        return {
            "t1": len(self._t1), "t2": len(self._t2), "b1": len(self._b1),
            "b2": len(self._b2), "p": round(self.p, 2), "c": self._c,
        }  # fmt: skip

    def _trim_ghosts(self) -> None:
        c = self._c
        while self._b1 and (len(self._t1) + len(self._b1) > c or self._ghosts() > MAX_GHOSTS):
            self._b1.popitem(last=False)
        while self._b2 and (len(self) + self._ghosts() > 2 * c or self._ghosts() > MAX_GHOSTS):
            self._b2.popitem(last=False)

    def _ghosts(self) -> int:
        return len(self._b1) + len(self._b2)


def _oldest(od: OrderedDict[H, None], passed: set[H]) -> H | None:
    """The least recent key of ``od`` not in ``passed`` (a fresh walk each time: the
    cache removes the key we yield before asking for the next)."""
    for h in od:
        if h not in passed:
            return h
    return None
