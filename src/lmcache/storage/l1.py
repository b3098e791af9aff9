"""The L1 cache: chunk objects in one shared-memory pool, with pins and eviction.

Object life cycle::

    reserve_write ──> WRITING ──commit_write──> READY <──> READY + pinned (pins > 0)
          │              │                        │
     (no space)     abort_write /              evicted (policy order, pins == 0)
                    lease TTL expired          or cleared
                         │                        │
                         └──────> freed <─────────┘

A *lease* pins a set of READY objects (reference counts): lookups hold one per
request until the engine retrieves or frees it, and every copy holds one while
the bytes move. Leases handed to other processes have a TTL, so a client that
dies cannot pin memory forever; leases held by server threads have none.

A forced `clear` removes everything from the index at once. Objects that a copy
is still using are only *doomed*: their pages are freed when the last pin goes,
and the copy learns (``release`` returns False) that its data was cleared, so
no thread ever reads pages that were handed to another object.

Thread-safe: one lock guards the index, the allocator and the eviction heap;
byte copies happen outside it, on pinned objects.

Eviction order is lazy: every READY object has exactly one heap entry, made at
commit with its priority then. A hit only bumps the object's access stats (a
lookup pins many chunks; a heap push per pin was most of its cost). Priorities
only grow with access, so a stored priority is a lower bound: eviction pops the
smallest entry, and if the object was used since, pushes it back with its
current priority instead of evicting it. The first entry popped whose priority
is current is the true minimum, so the policy's order is exact.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from lmcache.storage.allocator import Extent, PageAllocator
from lmcache.storage.eviction import AccessStats, EvictionPolicy
from lmcache.types import ObjectKey


class ObjState(enum.Enum):
    WRITING = "writing"
    READY = "ready"


@dataclass(slots=True, eq=False)
class _Obj:
    key: ObjectKey
    extent: Extent
    state: ObjState
    stats: AccessStats
    pins: int = 0
    heap_seq: int = 0  # the sequence number of its one live heap entry
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
    _obj: _Obj = field(repr=False, compare=False)


@dataclass(eq=False, slots=True)
class Lease:
    """Pins on READY objects. ``hit_groups`` = groups acquired by `acquire_prefix`."""

    id: int
    owner: str
    kind: Literal["hold", "transfer"]
    deadline: float | None
    objects: dict[ObjectKey, _Obj]
    hit_groups: int = 0
    expired: bool = False  # its TTL passed: the pins were dropped, the data is not trusted

    def offsets(self, keys: Sequence[ObjectKey]) -> list[tuple[int, int]]:
        return [(self.objects[k].extent.offset, self.objects[k].extent.nbytes) for k in keys]


class Refused(enum.StrEnum):
    """Why `L1Cache.reserve_write` gave no slot (equal to its value as a string)."""

    CACHED = "cached"  # the key exists (READY, or being written by someone else)
    CONFLICT = "conflict"  # the key exists with another layout tag: unreadable to this writer
    NO_SPACE = "no_space"  # nothing more can be evicted


Reserve = WriteSlot | Refused
# (priority when pushed, sequence number, object): the sequence breaks ties in push order
_HeapEntry = tuple[tuple[int, ...], int, _Obj]


class L1Cache:
    def __init__(
        self,
        pool: np.ndarray,
        policy: EvictionPolicy,
        page_size: int = 4096,
        *,
        committed_bytes: int | None = None,
        grow: Callable[[int], int] | None = None,
    ) -> None:
        """``pool`` is the whole address range. A lazy pool has only its first
        ``committed_bytes`` backed by memory; when no free run is long enough, ``grow(want)``
        is asked to back at least ``want`` bytes and returns how many are backed now (the
        same number: no more memory). Growing comes before evicting."""
        self.pool = pool
        self.policy = policy
        self._max_pages = pool.nbytes // page_size
        self._alloc = PageAllocator(
            pool.nbytes if committed_bytes is None else min(committed_bytes, pool.nbytes),
            page_size,
        )
        self._grow = grow
        self._index: dict[ObjectKey, _Obj] = {}
        self._heap: list[_HeapEntry] = []
        self._seq = itertools.count(1)
        self._leases: dict[int, Lease] = {}
        self._clock = itertools.count(1)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.evictions = 0
        self.eviction_error: str | None = None
        self.doomed_pending = 0
        # Remote writes cleared or expired mid-flight: freed at their commit or abort.
        self._doomed_writes: dict[int, _Obj] = {}

    # ----- writes ---------------------------------------------------------------

    def reserve_write(
        self, key: ObjectKey, nbytes: int, ttl: float | None = None, tag: bytes = b""
    ) -> Reserve:
        """Allocate an object for ``key``, evicting unpinned objects if needed, or say
        why not (`Refused`)."""
        with self._lock:
            existing = self._index.get(key)
            if existing is not None:
                return Refused.CACHED if existing.tag == tag else Refused.CONFLICT
            if self._alloc.pages_for(nbytes) > self._max_pages:
                return Refused.NO_SPACE  # could never fit: do not evict everything trying
            extent = self._allocate(nbytes)
            if extent is None:
                return Refused.NO_SPACE
            now = next(self._clock)
            obj = _Obj(key, extent, ObjState.WRITING, AccessStats(now, now), tag=tag)
            obj.write_deadline = None if ttl is None else time.monotonic() + ttl
            self._index[key] = obj
            return WriteSlot(key, extent.offset, nbytes, obj)

    def commit_write(self, slot: WriteSlot) -> bool:
        """Make a written object visible. False if it was cleared or expired meanwhile."""
        obj = slot._obj
        with self._lock:
            if obj.doomed or obj.freed or self._index.get(obj.key) is not obj:
                self._free_if_doomed(obj)
                return False
            obj.state = ObjState.READY
            obj.write_deadline = None
            self._push(obj)
            return True

    def abort_write(self, slot: WriteSlot) -> None:
        obj = slot._obj
        with self._lock:
            if self._index.get(obj.key) is obj and obj.state is ObjState.WRITING:
                del self._index[obj.key]
                self._free(obj)
            else:
                self._free_if_doomed(obj)

    def view(self, offset: int, nbytes: int) -> np.ndarray:
        return self.pool[offset : offset + nbytes]

    # ----- reads ------------------------------------------------------------------

    def acquire_prefix(
        self,
        groups: Iterable[Sequence[ObjectKey]],
        owner: str,
        kind: Literal["hold", "transfer"] = "hold",
        ttl: float | None = None,
        tag: bytes | None = None,
    ) -> Lease:
        """Pin the longest run of groups, from the first, whose keys are all READY
        (and written with layout ``tag``, when one is given)."""
        with self._lock:
            lease = self._new_lease(owner, kind, ttl)
            try:
                self._pin_groups(lease, groups, tag)
            except BaseException:  # e.g. a failing key generator: leave no pins behind
                for obj in lease.objects.values():
                    obj.pins -= 1
                    self._free_if_doomed(obj)
                lease.objects.clear()
                del self._leases[lease.id]
                raise
            return lease

    def extend(
        self, lease: Lease, groups: Iterable[Sequence[ObjectKey]], tag: bytes | None = None
    ) -> int:
        """Pin more groups into a live lease (as `acquire_prefix` would); returns how many.

        Nothing is pinned into a lease that was released, cleared or expired meanwhile.
        """
        with self._lock:
            if lease.id not in self._leases or lease.expired:
                return 0
            before = lease.hit_groups
            self._pin_groups(lease, groups, tag)
            return lease.hit_groups - before

    def _pin_groups(
        self, lease: Lease, groups: Iterable[Sequence[ObjectKey]], tag: bytes | None
    ) -> None:
        # The hot loop of every lookup: locals and inlined `_touch`, no helper calls.
        index, ready, pinned, clock = self._index, ObjState.READY, lease.objects, self._clock
        for group in groups:
            for k in group:
                o = index.get(k)
                if o is None or o.state is not ready or (tag is not None and o.tag != tag):
                    return
            for k in group:
                if k not in pinned:
                    o = pinned[k] = index[k]
                    o.pins += 1
                    stats = o.stats
                    stats.last_access = next(clock)
                    stats.hits += 1
            lease.hit_groups += 1

    def acquire_all(
        self,
        keys: Sequence[ObjectKey],
        owner: str,
        ttl: float | None = None,
        tag: bytes | None = None,
    ) -> Lease | None:
        """Pin every key for a copy, or nothing (None) if any is missing.

        Copies done by other processes get a ``ttl``; copies by server threads do not.
        """
        lease = self.acquire_prefix(([k] for k in keys), owner, kind="transfer", ttl=ttl, tag=tag)
        if lease.hit_groups == len(keys):
            return lease
        self.release(lease)
        return None

    def release(self, lease: Lease, keys: Iterable[ObjectKey] | None = None) -> bool:
        """Unpin ``keys`` (default: all) of a lease. False if any of them was cleared."""
        with self._lock:
            if keys is None:
                objs = list(lease.objects.values())
                lease.objects.clear()
            else:
                objs = [o for k in keys if (o := lease.objects.pop(k, None)) is not None]
            intact = True
            for obj in objs:
                obj.pins -= 1
                if obj.doomed:
                    intact = False
                    self._free_if_doomed(obj)
            if not lease.objects:
                self._leases.pop(lease.id, None)
            return intact and not lease.expired

    def touch(self, keys: Iterable[ObjectKey]) -> None:
        with self._lock:
            for key in keys:
                obj = self._index.get(key)
                if obj is not None and obj.state is ObjState.READY:
                    self._touch(obj)

    def contains(self, key: ObjectKey) -> bool:
        with self._lock:
            obj = self._index.get(key)
            return obj is not None and obj.state is ObjState.READY

    # ----- maintenance --------------------------------------------------------------

    def expire(self, now: float | None = None) -> tuple[int, int]:
        """Drop leases and write reservations past their TTL. Returns (leases, writes)."""
        now = time.monotonic() if now is None else now
        expired = [
            lease
            for lease in list(self._leases.values())
            if lease.deadline is not None and lease.deadline < now
        ]
        for lease in expired:
            lease.expired = True
            self.release(lease)
        writes = 0
        with self._lock:
            # A remote writer that outlived its TTL loses its object: the key leaves the
            # index (readers miss, others may store it) and its commit fails. Its pages
            # stay reserved until it commits or aborts (or its owner aborts for it when
            # the writer's process is gone): a writer that was only stalled may still be
            # copying into them, and pages handed to another object meanwhile would be
            # served with its bytes (found by tests/chaos.py, freezing workers).
            for obj in list(self._index.values()):
                if obj.write_deadline is not None and obj.write_deadline < now:
                    del self._index[obj.key]
                    obj.doomed = True
                    self.doomed_pending += 1
                    self._doomed_writes[id(obj)] = obj
                    writes += 1
        return len(expired), writes

    def clear(self) -> int:
        """Remove every object, pinned or not (pages in use by a copy are freed after it)."""
        with self._lock:
            for lease in [lease for lease in self._leases.values() if lease.kind == "hold"]:
                for obj in lease.objects.values():
                    obj.pins -= 1
                lease.objects.clear()
                del self._leases[lease.id]
            removed = len(self._index)
            for obj in self._index.values():
                self._discard(obj)
            self._index.clear()
            self._heap.clear()
            return removed

    def stats(self) -> dict[str, Any]:
        with self._lock:
            objs = self._index.values()
            return {
                "capacity_bytes": self._max_pages * self._alloc.page_size,
                # Backed by memory so far: less than capacity only in a lazy pool.
                "committed_bytes": self._alloc.capacity_bytes,
                "used_bytes": self._alloc.used_bytes,
                "objects": sum(1 for o in objs if o.state is ObjState.READY),
                "writing": sum(1 for o in objs if o.state is ObjState.WRITING),
                "locked": sum(1 for o in objs if o.pins > 0),
                "leases": len(self._leases),
                "evictions": self.evictions,
                "doomed_pending": self.doomed_pending,
                "largest_free_bytes": self._alloc.largest_free_bytes,
                "free_extents": self._alloc.free_extents,
                "eviction_policy": self.policy.name,
                "eviction_error": self.eviction_error,
            }

    # ----- internals (called with the lock held) ----------------------------------------

    def _new_lease(self, owner: str, kind: Literal["hold", "transfer"], ttl: float | None) -> Lease:
        deadline = None if ttl is None else time.monotonic() + ttl
        lease = Lease(next(self._ids), owner, kind, deadline, {})
        self._leases[lease.id] = lease
        return lease

    def _touch(self, obj: _Obj) -> None:
        """Record an access; the heap entry is corrected lazily, at eviction time."""
        stats = obj.stats
        stats.last_access = next(self._clock)
        stats.hits += 1

    def _push(self, obj: _Obj) -> None:
        obj.heap_seq = seq = next(self._seq)
        heapq.heappush(self._heap, (self.policy.priority(obj.stats), seq, obj))

    def _allocate(self, nbytes: int) -> Extent | None:
        skipped: list[_HeapEntry] = []
        try:
            while (extent := self._alloc.allocate(nbytes)) is None:
                if not self._grown(nbytes) and not self._evict_one(skipped):
                    return None
            return extent
        except Exception as exc:  # never let eviction die silently: health reports it
            self.eviction_error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            for entry in skipped:
                heapq.heappush(self._heap, entry)

    def _grown(self, nbytes: int) -> bool:
        """Whether a lazy pool got memory for another ``nbytes`` object at its end."""
        alloc = self._alloc
        if self._grow is None or alloc.total_pages >= self._max_pages:
            return False
        want = min(self._max_pages, alloc.total_pages + alloc.pages_for(nbytes))
        pages = min(self._max_pages, self._grow(want * alloc.page_size) // alloc.page_size)
        if pages <= alloc.total_pages:
            return False
        alloc.grow(pages)
        return True

    def _evict_one(self, skipped: list[_HeapEntry]) -> bool:
        while self._heap:
            entry = heapq.heappop(self._heap)
            priority, seq, obj = entry
            if obj.heap_seq != seq or self._index.get(obj.key) is not obj:
                continue  # defensive: an entry of an object that left the index
            if obj.pins > 0:
                skipped.append(entry)
                continue
            if priority != self.policy.priority(obj.stats):
                self._push(obj)  # used since it was pushed: back in, at its current priority
                continue
            del self._index[obj.key]
            self._free(obj)
            self.evictions += 1
            return True
        return False

    def _discard(self, obj: _Obj) -> None:
        """An object that left the index: its pages are freed now, or by the last copy
        still using them (pinned or being written: doomed)."""
        if obj.pins > 0 or obj.state is ObjState.WRITING:
            obj.doomed = True
            self.doomed_pending += 1
            if obj.write_deadline is not None:
                self._doomed_writes[id(obj)] = obj
        else:
            self._free(obj)

    def _free_if_doomed(self, obj: _Obj) -> None:
        if obj.doomed and obj.pins == 0 and not obj.freed:
            self.doomed_pending -= 1
            self._doomed_writes.pop(id(obj), None)
            self._free(obj)

    def _free(self, obj: _Obj) -> None:
        if not obj.freed:  # exactly once, whatever path gets here first
            obj.freed = True
            self._alloc.free(obj.extent)
