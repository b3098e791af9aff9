"""The L1 pool's memory: all of it at start, or a part that grows as chunks arrive (lazy).

    eager:  [############################ --l1-size-gb ############################]
    lazy:   [#### reserved ####|............ hole (no memory yet) ..................]
             ^ the L1 allocates first fit, so it fills from here; when no free run is
               long enough it asks `grow` for more before it evicts anything

Eager is the default when /dev/shm can hold the whole pool: every page is reserved and
pre-faulted at start, so no copy ever waits for the kernel. A pool larger than /dev/shm's
free space (the quick start's ``--l1-size-gb 100`` on a host with less /dev/shm) starts lazily
instead of refusing to start, and so does any pool given ``--l1-init-size-gb``. The
trade-offs of lazy: growing reserves (and zeroes) memory under the L1 lock, about 0.2 s per
GiB step, a pause of stores and lookups that happens once per step; the first copy into
freshly reserved pages takes page faults; and the pool only reaches what /dev/shm can give
when it grows (other users of /dev/shm compete for it), after which the L1 evicts as usual.
"""

from __future__ import annotations

import logging
import threading
import time

from lmcache.storage.shm import SEAL_BYTES, ShmSegment
from lmcache.storage.shm_names import free_shm_bytes

logger = logging.getLogger("lmcache.server")

GiB = 1 << 30
LAZY_START_BYTES = GiB  # reserved at start by a lazy pool that was not told how much
GROW_STEP_BYTES = GiB  # reserved per growth: ~0.2 s of zeroing, 100 steps for 100 GiB
WARN_EVERY_S = 60.0  # "cannot grow" at most this often


class PoolMemory:
    """The shared-memory segment behind L1 and, for a lazy pool, how it grows."""

    def __init__(self, segment: ShmSegment, lazy: bool) -> None:
        self.segment = segment
        self.lazy = lazy
        self._lock = threading.Lock()  # the L1 calls grow under its lock; this is belt and braces
        self._warned = 0.0

    @classmethod
    def create(cls, name: str, size: int, init: int | None = None) -> PoolMemory:
        """A pool of ``size`` bytes: eager if it fits in /dev/shm and ``init`` is None."""
        free = free_shm_bytes()
        if init is None and size + SEAL_BYTES <= free:
            return cls(ShmSegment.create(name, size), lazy=False)
        start = min(size, init if init is not None else LAZY_START_BYTES)
        segment = ShmSegment.create(name, size, reserve=start)
        if size + SEAL_BYTES > free:
            logger.warning(
                "L1 pool of %.2f GiB (--l1-size-gb) is larger than the %.2f GiB free in /dev/shm: "
                "it starts with %.2f GiB and grows as chunks arrive, up to what /dev/shm can "
                "give (enlarge /dev/shm, e.g. docker --shm-size, to reach the full size)",
                size / GiB, free / GiB, start / GiB,
            )  # fmt: skip
        else:
            logger.info(
                "L1 pool of %.2f GiB starts with %.2f GiB (--l1-init-size-gb) and grows as "
                "chunks arrive", size / GiB, start / GiB,
            )  # fmt: skip
        return cls(segment, lazy=True)

    @property
    def reserved(self) -> int:
        return self.segment.reserved

    def grow(self, want: int) -> int:
        """Reserve at least the first ``want`` bytes (a step more where possible); returns
        the bytes reserved now. `L1Cache` calls it when no free run is long enough."""
        with self._lock:
            seg = self.segment
            before = seg.reserved
            step = min(seg.size, max(want, before + GROW_STEP_BYTES))
            got = seg.reserve(step)
            if got < want:
                got = seg.reserve(want)  # the step did not fit; what was asked may
            if got > before:
                logger.info("L1 pool grew to %.2f GiB of %.2f GiB", got / GiB, seg.size / GiB)
            elif time.monotonic() - self._warned > WARN_EVERY_S:
                self._warned = time.monotonic()
                logger.warning(
                    "L1 pool cannot grow past %.2f GiB of %.2f GiB: /dev/shm is full; L1 evicts "
                    "to make room", got / GiB, seg.size / GiB,
                )  # fmt: skip
            return got
