"""The L1 pool's pages as the cache accounts for them: which are free, how many have
memory (a lazy pool grows), how many each ``cache_salt`` holds, and the objects whose
pages wait for their last user.

Kept apart from `lmcache.storage.l1` because it is the one place where an object's
pages are taken and given back, exactly once, whichever path gets there first (commit,
abort, eviction, clear, expiry, the last unpin): the cache above it decides *which*
object goes and when, this decides what that costs in pages. IsolatedLRU's quotas read
the per-salt bytes kept here (page-rounded: what L1 memory they really hold).

Not thread-safe: `L1Cache` calls it under its own lock.
"""

from __future__ import annotations

from collections.abc import Callable

from lmcache.storage.allocator import Extent, PageAllocator
from lmcache.storage.l1_objects import Obj


class L1Pages:
    def __init__(
        self,
        pool_bytes: int,
        page_size: int,
        committed_bytes: int | None = None,
        grow: Callable[[int], int] | None = None,
    ) -> None:
        """A pool of ``pool_bytes``; a lazy one has only ``committed_bytes`` backed, and
        ``grow(want)`` backs at least ``want`` bytes if it can, returning how many are
        backed now."""
        self._max_pages = pool_bytes // page_size
        self._alloc = PageAllocator(
            pool_bytes if committed_bytes is None else min(committed_bytes, pool_bytes),
            page_size,
        )
        self._grow = grow
        self._salt_bytes: dict[str, int] = {}  # pages held per salt (freed: gone)
        self.doomed_pending = 0

    @property
    def capacity_bytes(self) -> int:
        """The configured size: a lazy pool counts all of it."""
        return self._max_pages * self._alloc.page_size

    @property
    def committed_bytes(self) -> int:
        """Backed by memory so far: less than the capacity only in a lazy pool."""
        return self._alloc.capacity_bytes

    @property
    def used_bytes(self) -> int:
        return self._alloc.used_bytes

    @property
    def largest_free_bytes(self) -> int:
        return self._alloc.largest_free_bytes

    @property
    def free_extents(self) -> int:
        return self._alloc.free_extents

    def rounded(self, nbytes: int) -> int:
        """What an object of ``nbytes`` holds: whole pages."""
        return self._alloc.pages_for(nbytes) * self._alloc.page_size

    def fits_ever(self, nbytes: int) -> bool:
        """Whether an object of ``nbytes`` fits the whole pool (else evicting is futile)."""
        return self._alloc.pages_for(nbytes) <= self._max_pages

    def salt_bytes(self, salt: str) -> int:
        return self._salt_bytes.get(salt, 0)

    def take(self, nbytes: int, salt: str, evict_one: Callable[[], bool]) -> Extent | None:
        """Pages for ``nbytes`` charged to ``salt``: free ones, else a lazy pool grown, else
        what ``evict_one`` frees, for as long as it frees something; None: no room."""
        while (extent := self._alloc.allocate(nbytes)) is None:
            if not self._grown(nbytes) and not evict_one():
                return None
        self._salt_bytes[salt] = self._salt_bytes.get(salt, 0) + self._bytes(extent)
        return extent

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

    def doom(self, obj: Obj) -> None:
        """``obj`` left the index while a copy still uses its pages: they are freed by
        `free_if_doomed` when the last pin goes (or its writer commits or aborts)."""
        obj.doomed = True
        self.doomed_pending += 1

    def free_if_doomed(self, obj: Obj) -> None:
        if obj.doomed and obj.pins == 0 and not obj.freed:
            self.doomed_pending -= 1
            self.free(obj)

    def free(self, obj: Obj) -> None:
        if not obj.freed:  # exactly once, whatever path gets here first
            obj.freed = True
            self._alloc.free(obj.extent)
            left = self._salt_bytes.get(obj.salt, 0) - self._bytes(obj.extent)
            if left > 0:
                self._salt_bytes[obj.salt] = left
            else:
                self._salt_bytes.pop(obj.salt, None)

    def _bytes(self, extent: Extent) -> int:
        return extent.num_pages * self._alloc.page_size
