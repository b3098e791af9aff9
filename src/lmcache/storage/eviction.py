"""Eviction policies: a policy is a priority function, the container stays generic.

The L1 keeps every evictable object in a heap ordered by ``policy.priority``;
the smallest priority is evicted first. A policy never sees locks: pinned
objects are skipped by the container, not by the policy.

    LRU   (last_access,)          least recently used first
    LFU   (hits, last_access)     least frequently used first, LRU among equals
    FIFO  (created,)              oldest insertion first, access does not matter

Times are a logical clock (a counter bumped on every access), so orders are
exact and tests are deterministic.

A priority must never decrease when an object is accessed: the L1 re-sorts
touched objects lazily, at eviction time, and relies on a stale priority being
a lower bound of the current one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(slots=True)
class AccessStats:
    """What a policy may look at."""

    created: int
    last_access: int
    hits: int = 0


class EvictionPolicy(Protocol):
    name: str

    def priority(self, stats: AccessStats) -> tuple[int, ...]: ...


class LRU:
    name = "LRU"

    def priority(self, stats: AccessStats) -> tuple[int, ...]:
        return (stats.last_access,)


class LFU:
    name = "LFU"

    def priority(self, stats: AccessStats) -> tuple[int, ...]:
        return (stats.hits, stats.last_access)


class FIFO:
    name = "FIFO"

    def priority(self, stats: AccessStats) -> tuple[int, ...]:
        return (stats.created,)


POLICIES: dict[str, type[LRU] | type[LFU] | type[FIFO]] = {"LRU": LRU, "LFU": LFU, "FIFO": FIFO}


def make_policy(name: str) -> EvictionPolicy:
    try:
        return POLICIES[name.upper()]()
    except KeyError:
        raise ValueError(
            f"unknown eviction policy {name!r}; choose one of {', '.join(POLICIES)}"
        ) from None
