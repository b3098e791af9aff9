"""Several L2 writer threads: each chunk lands once per tier, the queue bound holds, `stop`
joins every writer, the store policies and the breaker still work, and store_gbps is
bytes over busy wall time (not over the sum of the writers' seconds)."""

from __future__ import annotations

import collections
import os
import threading
import time

import numpy as np
import pytest

from lmcache.server.tiers import TieredStore, _Counters
from lmcache.server.write_behind import WriteBehind
from lmcache.storage.chunk_store import ChunkLayout, ChunkStore
from lmcache.storage.eviction import make_policy
from lmcache.storage.l1 import L1Cache
from lmcache.storage.l2.base import L2Error
from lmcache.storage.l2.memory import MemoryL2
from lmcache.storage.l2.policies import StorePolicy, WriteFirst
from lmcache.types import ObjectKey

NBYTES = 4096
LAYOUT = ChunkLayout(b"layout-1", NBYTES)


class CountingL2(MemoryL2):
    """MemoryL2 that counts puts per key, takes ``delay`` seconds a put (so that writers
    overlap), and fails every put while ``down``."""

    def __init__(self, name: str, delay: float = 0.0) -> None:
        super().__init__(name=name)
        self.delay = delay
        self.down = False
        self.puts: collections.Counter[bytes] = collections.Counter()
        self.threads: set[str] = set()
        self._count_lock = threading.Lock()

    def put(self, key: ObjectKey, data: memoryview | bytes) -> None:
        if self.down:
            raise L2Error(f"{self.name}: down")
        time.sleep(self.delay)
        super().put(key, data)
        with self._count_lock:
            self.puts[bytes(key)] += 1
            self.threads.add(threading.current_thread().name)


def make_tiers(
    adapters: list[CountingL2],
    writers: int,
    queue_size: int = 1024,
    store_policy: StorePolicy | None = None,
) -> tuple[TieredStore, ChunkStore]:
    write_behind = WriteBehind(queue_size)
    store = ChunkStore(
        L1Cache(np.zeros(256 * NBYTES, dtype=np.uint8), make_policy("LRU")),
        on_stored=write_behind.offer,
    )
    tiers = TieredStore(store, adapters, write_behind, writers=writers, store_policy=store_policy)
    return tiers, store


def store_chunks(store: ChunkStore, n: int) -> list[ObjectKey]:
    keys = [ObjectKey(os.urandom(48)) for _ in range(n)]

    def fill(i: int, out: np.ndarray) -> bool:
        out[:] = i % 251
        return True

    assert store.write(keys, LAYOUT, fill).stored == n
    return keys


def wait_stored(tiers: TieredStore, n: int) -> None:
    deadline = time.monotonic() + 10
    while tiers.counters.snapshot().stored < n or len(tiers.write_behind):
        assert time.monotonic() < deadline, tiers.status()
        time.sleep(0.005)


def test_several_writers_copy_every_chunk_once_to_every_tier() -> None:
    a, b = CountingL2("a", delay=0.005), CountingL2("b", delay=0.005)
    tiers, store = make_tiers([a, b], writers=4)
    tiers.start()
    try:
        store_chunks(store, 40)
        wait_stored(tiers, 80)
        assert len(a.puts) == len(b.puts) == 40
        assert set(a.puts.values()) == set(b.puts.values()) == {1}
        assert len(a.threads) > 1  # the work was shared
        status = tiers.status()[0]
        assert status["stored_objects"] == 80 and status["queue_depth"] == 0
        c = tiers.counters.snapshot()
        assert c.store_bytes == 80 * NBYTES and c.store_seconds > 0
        assert status["store_gbps"] == round(c.store_bytes / c.store_seconds / 1e9, 3)
        assert tiers.writer_alive and tiers.problems() == []
    finally:
        tiers.stop()
    assert not any(w.is_alive() for w in tiers._writers)  # stop joined every writer


def test_stop_joins_every_writer_while_chunks_are_queued() -> None:
    slow = CountingL2("slow", delay=0.02)
    tiers, store = make_tiers([slow], writers=3)
    tiers.start()
    store_chunks(store, 50)
    tiers.stop()  # the queued rest is dropped, L2 is a cache
    assert not any(w.is_alive() for w in tiers._writers)
    assert set(slow.puts.values()) <= {1} and len(slow.puts) < 50
    assert not tiers.writer_alive and tiers.problems() == ["an L2 writer thread is dead"]


def test_write_first_with_several_writers_falls_back_while_the_first_is_down() -> None:
    first, second = CountingL2("first"), CountingL2("second")
    first.down = True
    tiers, store = make_tiers([first, second], writers=3, store_policy=WriteFirst())
    tiers.start()
    try:
        store_chunks(store, 20)
        wait_stored(tiers, 20)
        assert not first.puts and len(second.puts) == 20 and set(second.puts.values()) == {1}
        assert not tiers._up(first) and tiers._up(second)  # the breaker tripped
    finally:
        tiers.stop()


def test_the_queue_bound_holds_and_the_stop_mark_wakes_every_taker() -> None:
    wb = WriteBehind(3)
    for i in range(5):
        wb.offer(ObjectKey(bytes([i]) * 48), b"t")
    assert len(wb) == 3 and wb.skipped_full == 2
    assert wb.take() is not None
    wb.offer(ObjectKey(b"x" * 48), b"t")  # room for one again
    assert len(wb) == 3 and wb.skipped_full == 2
    wb.close()
    assert [wb.take() for _ in range(4)] == [None] * 4  # queued chunks dropped; None stays
    wb.offer(ObjectKey(b"y" * 48), b"t")  # stopping: neither queued nor counted as full
    assert wb.take() is None and wb.skipped_full == 2


def test_store_seconds_is_busy_wall_time_not_the_sum_over_writers() -> None:
    counters = _Counters()
    barrier = threading.Barrier(4)

    def copy() -> None:
        with counters.writing():
            barrier.wait()
            time.sleep(0.2)

    threads = [threading.Thread(target=copy) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert 0.2 <= counters.snapshot().store_seconds < 0.6  # the sum would be >= 0.8


def test_a_busy_stretch_still_running_counts_up_to_now() -> None:
    counters = _Counters()
    with counters.writing():
        time.sleep(0.05)
        assert counters.snapshot().store_seconds >= 0.05
        assert counters.store_seconds == 0.0  # added once the last writer is out
    assert counters.snapshot().store_seconds >= 0.05


@pytest.mark.parametrize("writers", [1, 2])
def test_one_or_two_writers_both_work(writers: int) -> None:
    a = CountingL2("a")
    tiers, store = make_tiers([a], writers=writers)
    tiers.start()
    try:
        store_chunks(store, 10)
        wait_stored(tiers, 10)
        assert set(a.puts.values()) == {1} and len(a.puts) == 10
    finally:
        tiers.stop()
