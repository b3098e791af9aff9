"""The seam between a cache and its eviction policy.

A cache (the L1, an L2 adapter's `CapacityIndex`) owns its objects, their bytes and their
pins; a policy only orders *handles* (the cache's own object, or a key) for eviction:

    cache                                  policy
      object became readable ──on_insert──>  starts tracking it (with its salt)
      object was read        ──on_access──>  (only if ``needs_access``: see below)
      object left            ──on_remove──>  forgets it (``evicted``: it was the victim)
      needs room             <──victims───   candidates, least valuable first

The cache walks `victims` and takes the first candidate it may evict (pins are the
cache's business, never the policy's), calls ``on_remove(h, evicted=True)`` for it, and
either asks for the next victim or closes the iterator. Candidates the cache skipped stay
tracked as they were: walking the victims without removing anything changes nothing.

``AccessStats`` are owned and updated by the cache (a logical clock; hits): a policy
may read them at any time, so policies that rank by them (`HeapPolicy`) need no
``on_access`` call on the lookup's hot path. Policies with their own order of access
(ARC, IsolatedLRU) set ``needs_access`` and are told every access.

``limit(salt)``: bytes that a salt's objects may take together (None: no limit of its
own). Only IsolatedLRU has limits; the cache enforces them by evicting ``victims(salt)``.
"""

from __future__ import annotations

from collections.abc import Generator, Hashable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

H = TypeVar("H", bound=Hashable)


@dataclass(slots=True)
class AccessStats:
    """What the cache records per object (the policy may read it)."""

    created: int
    last_access: int
    hits: int = 0


class EvictionPolicy(Protocol[H]):
    name: str
    needs_access: bool  # on_access must be called on every read (else stats suffice)

    def on_insert(self, h: H, stats: AccessStats, salt: str = "") -> None:
        """``h`` is now readable and may be evicted."""

    def on_access(self, h: H) -> None:
        """``h`` was read (its stats were updated already)."""

    def on_remove(self, h: H, evicted: bool = False) -> None:
        """``h`` left the cache: evicted (as a victim) or deleted, cleared, replaced."""

    def victims(self, salt: str | None = None) -> Generator[H, None, None]:
        """Candidates, least valuable first; ``salt``: only that salt's objects, if the
        policy isolates salts (others ignore it). The caller may ``on_remove(h, True)`` the
        candidate just yielded before advancing; everything else stays as it was."""
        ...

    def limit(self, salt: str) -> int | None:
        """Bytes the objects of ``salt`` may take together; None: no limit of their own."""

    def clear(self) -> None:
        """Forget every handle (the cache was cleared)."""

    def describe(self) -> dict[str, Any]:
        """The policy's state for /status (no salts: they are tenants' secrets)."""
        ...

    def __len__(self) -> int: ...
