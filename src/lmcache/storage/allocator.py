"""A page allocator for the L1 pool: objects get runs of contiguous pages.

Chunks of different models have different byte sizes, so the pool is not cut
into fixed slots. Each object takes ``ceil(nbytes / page_size)`` contiguous
pages (contiguity keeps every copy a single numpy call). Free space is a sorted
list of extents, coalesced on free:

    pages:  [AAAA][..][BBBBBB][....][CC][......]
    free:          (4,2)      (12,4)    (18,6)     <- (start, length), sorted by start

Allocation is first fit, so a pool fills from its start: a lazy pool (`grow`) only needs
memory behind the pages handed out so far. Fragmentation is bounded in practice because one
deployment has few distinct chunk sizes; when no run is long enough the L1
evicts more objects (see `L1Cache`), which coalesces neighbours.

Not thread-safe: the L1 calls it under its own lock.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Extent:
    """A run of pages: byte ``offset`` in the pool and ``nbytes`` actually used."""

    first_page: int
    num_pages: int
    offset: int
    nbytes: int


class PageAllocator:
    def __init__(self, capacity_bytes: int, page_size: int = 4096) -> None:
        if page_size <= 0 or page_size & (page_size - 1):
            raise ValueError("page_size must be a power of two")
        self.page_size = page_size
        self.total_pages = capacity_bytes // page_size
        self._starts: list[int] = [0] if self.total_pages else []
        self._lengths: dict[int, int] = {0: self.total_pages} if self.total_pages else {}
        self.used_pages = 0

    @property
    def capacity_bytes(self) -> int:
        return self.total_pages * self.page_size

    @property
    def used_bytes(self) -> int:
        return self.used_pages * self.page_size

    def pages_for(self, nbytes: int) -> int:
        return max(1, -(-nbytes // self.page_size))

    def allocate(self, nbytes: int) -> Extent | None:
        """Return an extent of at least ``nbytes`` or None when no run is long enough."""
        need = self.pages_for(nbytes)
        for i, start in enumerate(self._starts):
            length = self._lengths[start]
            if length < need:
                continue
            del self._lengths[start]
            if length == need:
                del self._starts[i]
            else:
                self._starts[i] = start + need
                self._lengths[start + need] = length - need
            self.used_pages += need
            return Extent(start, need, start * self.page_size, nbytes)
        return None

    def free(self, extent: Extent) -> None:
        start, length = extent.first_page, extent.num_pages
        i = bisect.bisect_left(self._starts, start)
        if i < len(self._starts) and self._starts[i] < start + length:
            raise ValueError(f"double free of pages {start}..{start + length}")
        if i > 0:
            prev = self._starts[i - 1]
            if prev + self._lengths[prev] > start:
                raise ValueError(f"double free of pages {start}..{start + length}")
        self.used_pages -= length
        # Coalesce with the following free run, then with the preceding one.
        if i < len(self._starts) and self._starts[i] == start + length:
            length += self._lengths.pop(self._starts.pop(i))
        if i > 0 and self._starts[i - 1] + self._lengths[self._starts[i - 1]] == start:
            prev = self._starts[i - 1]
            self._lengths[prev] += length
            return
        self._starts.insert(i, start)
        self._lengths[start] = length

    def grow(self, total_pages: int) -> None:
        """Add pages ``[total_pages_before, total_pages)`` as free (a lazy pool that got more
        memory); merged with a free run that ends where they start."""
        added = total_pages - self.total_pages
        if added <= 0:
            return
        start, self.total_pages = self.total_pages, total_pages
        if self._starts and self._starts[-1] + self._lengths[self._starts[-1]] == start:
            self._lengths[self._starts[-1]] += added
        else:
            self._starts.append(start)
            self._lengths[start] = added

    @property
    def largest_free_bytes(self) -> int:
        return max(self._lengths.values(), default=0) * self.page_size

    @property
    def free_extents(self) -> int:
        return len(self._starts)
