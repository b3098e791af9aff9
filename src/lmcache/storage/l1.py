"""The L1 cache: chunk objects in one shared-memory pool, with pins and eviction.

Object life cycle::

    reserve_write ──> WRITING ──commit_write──> READY <──> READY + pinned (pins > 0)
          │              │                        │
     (no space)     abort_write /              evicted (policy order, pins == 0)
                    lease TTL expired          or cleared / removed
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

Thread-safe: one lock guards the index, the pages (`lmcache.storage.l1_pages`: free,
grown, per salt, doomed) and the eviction policy; byte copies happen outside it, on
pinned objects.

Eviction: the policy (`lmcache.storage.eviction`) orders READY objects, told of each
commit, read and removal; the cache walks its victims and evicts the first one nobody
pins. On demand, when a write finds no free run (after a lazy pool tried to grow), and
in the background (`evict_to`, the watermark thread). Every object carries its writer's
``cache_salt``; a policy with per-salt limits (IsolatedLRU) has a write over its salt's
limit evict that salt's own objects first, and only ever that salt's.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Generator, Iterable, Sequence
from contextlib import closing
from typing import Any, Literal

import numpy as np

from lmcache.storage.allocator import Extent
from lmcache.storage.eviction import AccessStats, EvictionPolicy
from lmcache.storage.l1_objects import Lease, Obj, ObjState, Refused, Reserve, WriteSlot
from lmcache.storage.l1_pages import L1Pages
from lmcache.types import ObjectKey

__all__ = ["L1Cache", "Lease", "ObjState", "Refused", "Reserve", "WriteSlot"]


class L1Cache:
    def __init__(
        self,
        pool: np.ndarray,
        policy: EvictionPolicy[Obj],
        page_size: int = 4096,
        *,
        committed_bytes: int | None = None,
        grow: Callable[[int], int] | None = None,
    ) -> None:
        """``pool`` is the whole address range; ``committed_bytes`` and ``grow``: a lazy
        pool (`L1Pages`). Growing comes before evicting."""
        self.pool = pool
        self.policy = policy
        self._pages = L1Pages(pool.nbytes, page_size, committed_bytes, grow)
        self._index: dict[ObjectKey, Obj] = {}
        self._leases: dict[int, Lease] = {}
        self._clock = itertools.count(1)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.evictions = 0
        self.eviction_error: str | None = None

    # ----- writes ---------------------------------------------------------------

    def reserve_write(
        self, key: ObjectKey, nbytes: int, ttl: float | None = None, tag: bytes = b"",
        salt: str = "",
    ) -> Reserve:  # fmt: skip
        """Allocate an object for ``key`` (written for ``salt``), evicting unpinned objects
        if needed, or say why not (`Refused`)."""
        with self._lock:
            existing = self._index.get(key)
            if existing is not None:
                return Refused.CACHED if existing.tag == tag else Refused.CONFLICT
            if not self._pages.fits_ever(nbytes):
                return Refused.NO_SPACE  # could never fit: do not evict everything trying
            if not self._fit_limit(salt, self._pages.rounded(nbytes)):
                return Refused.NO_SPACE
            extent = self._allocate(nbytes, salt)
            if extent is None:
                return Refused.NO_SPACE
            now = next(self._clock)
            obj = Obj(key, extent, ObjState.WRITING, AccessStats(now, now), salt=salt, tag=tag)
            obj.write_deadline = None if ttl is None else time.monotonic() + ttl
            self._index[key] = obj
            return WriteSlot(key, extent.offset, nbytes, obj)

    def commit_write(self, slot: WriteSlot) -> bool:
        """Make a written object visible. False if it was cleared or expired meanwhile."""
        obj = slot._obj
        with self._lock:
            if obj.doomed or obj.freed or self._index.get(obj.key) is not obj:
                self._pages.free_if_doomed(obj)
                return False
            obj.state = ObjState.READY
            obj.write_deadline = None
            self.policy.on_insert(obj, obj.stats, obj.salt)
            return True

    def abort_write(self, slot: WriteSlot) -> None:
        obj = slot._obj
        with self._lock:
            if self._index.get(obj.key) is obj and obj.state is ObjState.WRITING:
                del self._index[obj.key]
                self._pages.free(obj)
            else:
                self._pages.free_if_doomed(obj)

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
                    self._pages.free_if_doomed(obj)
                lease.objects.clear()
                del self._leases[lease.id]
                raise
            return lease

    def extend(
        self, lease: Lease, groups: Iterable[Sequence[ObjectKey]], tag: bytes | None = None
    ) -> int:
        """Pin more groups into a live lease (as `acquire_prefix` would); returns how
        many. Nothing is pinned into a lease released, cleared or expired meanwhile."""
        with self._lock:
            if lease.id not in self._leases or lease.expired:
                return 0
            before = lease.hit_groups
            self._pin_groups(lease, groups, tag)
            return lease.hit_groups - before

    def _pin_groups(
        self, lease: Lease, groups: Iterable[Sequence[ObjectKey]], tag: bytes | None
    ) -> None:
        # The hot loop of every lookup: locals and inlined `_touch`, no helper calls
        # (but the policy's, for the policies that order by access themselves).
        index, ready, pinned, clock = self._index, ObjState.READY, lease.objects, self._clock
        access = self.policy.on_access if self.policy.needs_access else None
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
                    if access is not None:
                        access(o)
            lease.hit_groups += 1

    def acquire_all(
        self,
        keys: Sequence[ObjectKey],
        owner: str,
        ttl: float | None = None,
        tag: bytes | None = None,
    ) -> Lease | None:
        """Pin every key for a copy, or nothing (None) if any is missing. Copies done by
        other processes get a ``ttl``; copies by server threads do not."""
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
                    self._pages.free_if_doomed(obj)
            if not lease.objects:
                self._leases.pop(lease.id, None)
            return intact and not lease.expired

    def touch(self, keys: Iterable[ObjectKey]) -> None:
        with self._lock:
            for key in keys:
                obj = self._index.get(key)
                if obj is not None and obj.state is ObjState.READY:
                    stats = obj.stats
                    stats.last_access = next(self._clock)
                    stats.hits += 1
                    self.policy.on_access(obj)

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
            # A remote writer past its TTL loses its object (readers miss, its commit
            # fails), but its pages stay reserved until it commits or aborts (or its owner
            # does, when its process is gone): a stalled writer may still copy into them
            # (found by tests/chaos.py, freezing workers).
            for obj in list(self._index.values()):
                if obj.write_deadline is not None and obj.write_deadline < now:
                    del self._index[obj.key]
                    self._pages.doom(obj)
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
            self.policy.clear()
            return removed

    def evict_to(self, target_bytes: int, batch: int = 256) -> int:
        """Evict unpinned objects in policy order until at most ``target_bytes`` are used
        (or nothing more can go); returns how many. At most ``batch`` per hold of the lock,
        so that lookups and copies get in between (the watermark thread calls this)."""
        evicted = 0
        while True:
            with self._lock:
                done = 0
                with closing(self.policy.victims()) as victims:
                    while self._pages.used_bytes > target_bytes and done < batch:
                        if not self._evict_one(victims):
                            return evicted + done
                        done += 1
                evicted += done
                if done < batch:
                    return evicted

    def enforce_limit(self, salt: str) -> int:
        """Evict ``salt``'s unpinned objects (its own LRU order) until it is within its
        policy limit (after a quota was lowered or deleted); returns how many went."""
        with self._lock:
            before = self.evictions
            self._fit_limit(salt, 0)
            return self.evictions - before

    def usage(self) -> tuple[int, int]:
        """(used bytes, configured capacity): a lazy pool counts its full size."""
        return self._pages.used_bytes, self._pages.capacity_bytes

    def salt_bytes(self, salt: str) -> int:
        with self._lock:
            return self._pages.salt_bytes(salt)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            objs = self._index.values()
            return {
                "capacity_bytes": self._pages.capacity_bytes,
                "committed_bytes": self._pages.committed_bytes,  # < capacity: a lazy pool
                "used_bytes": self._pages.used_bytes,
                "objects": sum(1 for o in objs if o.state is ObjState.READY),
                "writing": sum(1 for o in objs if o.state is ObjState.WRITING),
                "locked": sum(1 for o in objs if o.pins > 0),
                "leases": len(self._leases),
                "evictions": self.evictions,
                "doomed_pending": self._pages.doomed_pending,
                "largest_free_bytes": self._pages.largest_free_bytes,
                "free_extents": self._pages.free_extents,
                "eviction_policy": self.policy.name,
                "eviction_policy_state": self.policy.describe(),
                "eviction_error": self.eviction_error,
            }

    # ----- operator actions (lmcache.storage.l1_admin) ---------------------------------

    def keys(self) -> list[ObjectKey]:
        """Every key in the index (a copy), READY or being written."""
        with self._lock:
            return list(self._index)

    def objects(self, keys: Iterable[ObjectKey]) -> list[Obj]:
        """The objects of ``keys`` still in the index (for display: read, never change)."""
        with self._lock:
            return [o for k in keys if (o := self._index.get(k)) is not None]

    def remove(self, keys: Iterable[ObjectKey] | None, force: bool) -> tuple[int, int]:
        """Remove ``keys`` (None: every object); locked or still-being-written ones only
        with ``force`` (doomed: freed after the copy using them). Returns (removed, kept);
        keys not in the index count as neither."""
        removed = kept = 0
        with self._lock:
            objs = list(self._index.values()) if keys is None else [
                o for k in keys if (o := self._index.get(k)) is not None
            ]  # fmt: skip
            for obj in objs:
                if not force and (obj.pins > 0 or obj.state is ObjState.WRITING):
                    kept += 1
                    continue
                del self._index[obj.key]
                self._discard(obj)
                removed += 1
        return removed, kept

    # ----- internals (called with the lock held) ----------------------------------------

    def _new_lease(self, owner: str, kind: Literal["hold", "transfer"], ttl: float | None) -> Lease:
        deadline = None if ttl is None else time.monotonic() + ttl
        lease = Lease(next(self._ids), owner, kind, deadline, {})
        self._leases[lease.id] = lease
        return lease

    def _fit_limit(self, salt: str, nbytes: int) -> bool:
        """Whether ``nbytes`` more of ``salt`` fit its policy limit, after evicting its own
        unpinned objects as needed."""
        limit = self.policy.limit(salt)
        if limit is None:
            return True
        if nbytes > limit:
            return False
        with closing(self.policy.victims(salt)) as victims:
            while self._pages.salt_bytes(salt) + nbytes > limit:
                if not self._evict_one(victims):
                    return False
        return True

    def _allocate(self, nbytes: int, salt: str) -> Extent | None:
        limited = self.policy.limit(salt) is not None  # then only the salt's own objects go
        try:
            with closing(self.policy.victims(salt if limited else None)) as victims:
                return self._pages.take(nbytes, salt, lambda: self._evict_one(victims))
        except Exception as exc:  # never let eviction die silently: health reports it
            self.eviction_error = f"{type(exc).__name__}: {exc}"
            raise

    def _evict_one(self, victims: Generator[Obj, None, None]) -> bool:
        """Evict the policy's next victim that nobody pins; False: there is none."""
        for obj in victims:
            if obj.pins > 0 or self._index.get(obj.key) is not obj:
                continue  # pinned: the container skips it, the policy keeps it
            del self._index[obj.key]
            self.policy.on_remove(obj, evicted=True)
            self._pages.free(obj)
            self.evictions += 1
            return True
        return False

    def _discard(self, obj: Obj) -> None:
        """An object that left the index: its pages are freed now, or by the last copy
        still using them (pinned or being written: doomed). The policy forgets it."""
        if obj.state is ObjState.READY:
            self.policy.on_remove(obj)
        if obj.pins > 0 or obj.state is ObjState.WRITING:
            self._pages.doom(obj)
        else:
            self._pages.free(obj)
