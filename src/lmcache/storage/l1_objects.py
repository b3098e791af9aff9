"""The L1's value types: an object's state, a writer's slot, a reader's lease, a refusal.

Kept apart from `lmcache.storage.l1` (the cache's behaviour) so that the types callers
hold (`WriteSlot`, `Lease`, `Refused`) read on their own.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from lmcache.storage.allocator import Extent
from lmcache.storage.eviction import AccessStats
from lmcache.types import ObjectKey


class ObjState(enum.Enum):
    WRITING = "writing"
    READY = "ready"


@dataclass(slots=True, eq=False)
class Obj:
    """One L1 object (hashed by identity: it is the eviction policy's handle)."""

    key: ObjectKey
    extent: Extent
    state: ObjState
    stats: AccessStats
    salt: str = ""  # the writer's cache_salt: IsolatedLRU's quotas count by it
    pins: int = 0
    write_deadline: float | None = None
    doomed: bool = False  # out of the index, pages still in use by a copy
    freed: bool = False  # pages returned to the allocator
    tag: bytes = b""  # the writer's chunk layout: readers with another layout see a miss


@dataclass(frozen=True, slots=True)
class WriteSlot:
    """Where a writer puts one object's bytes: ``pool[offset : offset + nbytes]``."""

    key: ObjectKey
    offset: int
    nbytes: int
    _obj: Obj = field(repr=False, compare=False)


@dataclass(eq=False, slots=True)
class Lease:
    """Pins on READY objects. ``hit_groups`` = groups acquired by `acquire_prefix`."""

    id: int
    owner: str
    kind: Literal["hold", "transfer"]
    deadline: float | None
    objects: dict[ObjectKey, Obj]
    hit_groups: int = 0
    expired: bool = False  # its TTL passed: the pins were dropped, the data is not trusted

    def offsets(self, keys: Sequence[ObjectKey]) -> list[tuple[int, int]]:
        return [(self.objects[k].extent.offset, self.objects[k].extent.nbytes) for k in keys]


class Refused(enum.StrEnum):
    """Why `L1Cache.reserve_write` gave no slot (equal to its value as a string)."""

    CACHED = "cached"  # the key exists (READY, or being written by someone else)
    CONFLICT = "conflict"  # the key exists with another layout tag: unreadable to this writer
    NO_SPACE = "no_space"  # nothing more can be evicted (or the salt's quota is spent)


Reserve = WriteSlot | Refused
