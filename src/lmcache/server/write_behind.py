"""What the L2 writers work from: the bounded write-behind queue (`TieredStore` runs the
writers; which tiers get a chunk is a store policy, `lmcache.storage.l2.policies`)."""

from __future__ import annotations

import queue
import threading

from lmcache.defaults import L2_QUEUE_SIZE
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
        self.accepted = 0  # chunks queued (upstream's l2_store_submitted)

    def offer(self, key: ObjectKey, tag: bytes) -> None:
        with self._lock:
            if self._closed:
                return  # stopping: L2 is a cache
            if self._queue.qsize() >= self.size:
                self.skipped_full += 1
                return
            self._queue.put_nowait((key, tag))
            self.accepted += 1

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
