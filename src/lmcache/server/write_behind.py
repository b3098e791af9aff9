"""What the L2 writers work from: the bounded write-behind queue, and the store policies
that pick the tiers a chunk is copied to (`lmcache.server.tiers.TieredStore` runs both)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from typing import Protocol

from lmcache.defaults import L2_QUEUE_SIZE
from lmcache.storage.l2.base import L2Adapter
from lmcache.types import ObjectKey


class WriteBehind:
    """The bounded queue of chunks to copy to L2. `offer` is the store's ``on_stored`` hook:
    it never blocks a store, and a full queue skips (and counts) the chunk."""

    def __init__(self, size: int = L2_QUEUE_SIZE) -> None:
        self.size = size  # --l2-queue-size
        # Unbounded underneath; `offer` keeps the bound under the lock. Then `close` can
        # always post its stop mark, which every writer passes on to the next one
        # (`take`), however many writers there are and however full the queue was.
        self._queue: queue.Queue[tuple[ObjectKey, bytes] | None] = queue.Queue()
        self._lock = threading.Lock()  # offered from every request thread at once
        self._closed = False
        self.skipped_full = 0

    def offer(self, key: ObjectKey, tag: bytes) -> None:
        with self._lock:
            if self._closed:
                return  # stopping: L2 is a cache
            if self._queue.qsize() >= self.size:
                self.skipped_full += 1
                return
            self._queue.put_nowait((key, tag))

    def take(self) -> tuple[ObjectKey, bytes] | None:
        """The next chunk to copy; None: stop."""
        item = self._queue.get()
        if item is None:
            self._queue.put_nowait(None)  # the stop mark stays for the other writers
        return item

    def close(self) -> None:
        """Drop what is queued (L2 is a cache) and wake every writer to stop."""
        with self._lock:
            self._closed = True
            while True:
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break
            self._queue.put_nowait(None)

    def __len__(self) -> int:
        return self._queue.qsize()


class StorePolicy(Protocol):
    """Which adapters a chunk is copied to, given which are up (as a priority function is
    to L1 eviction: the tiered store stays generic)."""

    name: str

    def targets(
        self, adapters: Sequence[L2Adapter], up: Callable[[L2Adapter], bool]
    ) -> list[L2Adapter]: ...


class WriteAll:
    """Every tier that is up: a copy in each (the default)."""

    name = "all"

    def targets(
        self, adapters: Sequence[L2Adapter], up: Callable[[L2Adapter], bool]
    ) -> list[L2Adapter]:
        return [a for a in adapters if up(a)]


class WriteFirst:
    """The first tier that is up, in configured order: later tiers are a fallback chain
    that takes writes only while the earlier ones are down."""

    name = "first"

    def targets(
        self, adapters: Sequence[L2Adapter], up: Callable[[L2Adapter], bool]
    ) -> list[L2Adapter]:
        return next(([a] for a in adapters if up(a)), [])


STORE_POLICIES: dict[str, Callable[[], StorePolicy]] = {
    "all": WriteAll,
    "first": WriteFirst,
}
