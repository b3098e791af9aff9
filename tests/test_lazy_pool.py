"""A lazy L1 pool: memory for the first part only, more as chunks arrive (issue 13: the quick
start's ``--l1-size-gb 100`` on a host with less /dev/shm)."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest

from lmcache.engine.shm_kv import ShmKVCache
from lmcache.server.l1_pool import PoolMemory
from lmcache.storage.allocator import PageAllocator
from lmcache.storage.eviction import make_policy
from lmcache.storage.l1 import L1Cache, Refused, WriteSlot
from lmcache.storage.shm import ShmSegment
from lmcache.storage.shm_names import free_shm_bytes, shm_path

from .conftest import fill_random, register, start_server, unique_tokens
from .test_storage_unit import key

PAGE = 4096


def allocated(segment: ShmSegment) -> int:
    """Bytes of the segment's file that have memory (tmpfs blocks)."""
    return os.stat(shm_path(segment.name)).st_blocks * 512


def test_allocator_grows_at_its_end_and_merges_the_last_free_run() -> None:
    a = PageAllocator(4 * PAGE, PAGE)
    first = a.allocate(3 * PAGE)
    assert first is not None and a.allocate(2 * PAGE) is None  # one page left
    a.grow(6)
    assert a.free_extents == 1 and a.largest_free_bytes == 3 * PAGE  # 1 + 2 merged
    assert a.allocate(3 * PAGE) is not None and a.capacity_bytes == 6 * PAGE
    a.grow(5)  # never shrinks
    assert a.capacity_bytes == 6 * PAGE


class FakeGrowth:
    """Backs up to ``limit`` bytes, as /dev/shm would before it is full."""

    def __init__(self, limit: int) -> None:
        self.limit, self.asked = limit, list[int]()

    def __call__(self, want: int) -> int:
        self.asked.append(want)
        return min(want, self.limit)


def test_l1_grows_before_it_evicts_and_evicts_once_it_cannot_grow() -> None:
    growth = FakeGrowth(limit=3 * PAGE)
    l1 = L1Cache(
        np.zeros(8 * PAGE, dtype=np.uint8), make_policy("LRU"), PAGE,
        committed_bytes=PAGE, grow=growth,
    )  # fmt: skip
    for i in range(3):
        slot = l1.reserve_write(key(i), PAGE)
        assert isinstance(slot, WriteSlot) and l1.commit_write(slot)
    assert l1.evictions == 0 and l1.stats()["committed_bytes"] == 3 * PAGE
    slot = l1.reserve_write(key(3), PAGE)  # cannot grow: the oldest goes
    assert isinstance(slot, WriteSlot) and l1.evictions == 1 and not l1.contains(key(0))
    assert l1.stats()["capacity_bytes"] == 8 * PAGE
    assert l1.reserve_write(key(9), 9 * PAGE) is Refused.NO_SPACE  # beyond the whole pool


def test_a_lazy_segment_has_memory_only_where_reserved() -> None:
    name = f"lmcache_test_lazy_{os.getpid()}"
    seg = ShmSegment.create(name, 64 << 20, reserve=1 << 20)
    try:
        assert seg.reserved == 1 << 20 and allocated(seg) < 4 << 20
        peer = ShmSegment.attach(seg.name, seg.token)  # a worker mapping the pool
        assert allocated(seg) < 4 << 20  # not pre-faulted: that would fill the hole
        peer.array[: 1 << 20] = 7
        assert seg.reserve(8 << 20) == 8 << 20 and allocated(seg) >= 8 << 20
        assert int(seg.array[: 1 << 20].sum()) == 7 << 20
        assert seg.reserve(1 << 40) == 64 << 20  # at most its size
        peer.close()
    finally:
        seg.close()
        seg.unlink()


def test_pool_memory_is_eager_when_it_fits_and_lazy_when_asked(
    caplog: pytest.LogCaptureFixture,
) -> None:
    eager = PoolMemory.create(f"lmcache_test_eager_{os.getpid()}", 4 << 20)
    lazy = PoolMemory.create(f"lmcache_test_lazy2_{os.getpid()}", 64 << 20, init=1 << 20)
    try:
        assert not eager.lazy and eager.reserved == 4 << 20
        assert lazy.lazy and lazy.reserved == 1 << 20
        with caplog.at_level(logging.INFO, "lmcache.server"):
            assert lazy.grow(2 << 20) == 64 << 20  # a step of 1 GiB, capped at the size
        assert "L1 pool grew to 0.06 GiB of 0.06 GiB" in caplog.text
    finally:
        for pool in (eager, lazy):
            pool.segment.close()
            pool.segment.unlink()


def test_the_quick_start_pool_size_starts_on_a_host_with_less_shm(engine: ShmKVCache) -> None:
    """``--l1-size-gb`` beyond /dev/shm's free space: a warning, not a refusal; the pool
    grows as an engine stores, and what was stored comes back byte for byte."""
    too_big = free_shm_bytes() / (1 << 30) + 50
    server = start_server(
        "--l1-size-gb", f"{too_big:.1f}", "--l1-init-size-gb", str(256 / (1 << 20))
    )  # 256 KiB at start: the chunks below need more
    try:
        log = server.log()
        assert "is larger than the" in log and "free in /dev/shm: it starts with" in log
        assert "LMCache cache server is running..." in log
        l1 = server.status()["l1"]
        assert l1["committed_bytes"] == 256 << 10 < l1["capacity_bytes"]
        client = server.client()
        register(client, engine, 21)
        fill_random(engine, 3)
        tokens = unique_tokens(4 * 256)
        reply = client.store("s", 21, tokens, start=0, end=4 * 256, block_ids=range(64))
        assert reply.stored_tokens == 4 * 256
        grown = server.status()["l1"]
        assert grown["committed_bytes"] > 256 << 10 and grown["evictions"] == 0
        assert "L1 pool grew to" in server.log()
        before = engine.blocks.copy()
        engine.blocks[:] = 0
        client.retrieve("r", 21, tokens, start=0, end=4 * 256, block_ids=range(64))
        np.testing.assert_array_equal(engine.blocks, before)
    finally:
        server.stop()


def test_a_worker_maps_a_lazy_pool_without_filling_it(engine: ShmKVCache) -> None:
    """lmcache_driven: the worker maps the whole pool, but only reserved pages get memory,
    and its copies into the pool (which grows meanwhile) round-trip byte for byte."""
    from lmcache.integration.vllm.transfer_paths import PoolPath

    from .test_worker_paths import BPC, load_spec, make_worker, store_spec

    server = start_server("--l1-size-gb", "1", "--l1-init-size-gb", str(64 / (1 << 20)))
    worker = make_worker(server, "lmcache_driven", engine)
    try:
        path = worker.path
        assert isinstance(path, PoolPath)
        assert allocated(path.pool) < 8 << 20  # 1 GiB mapped, not given memory
        fill_random(engine, 9)
        tokens = unique_tokens(2 * 256).tolist()
        src, dst = list(range(2 * BPC)), list(range(2 * BPC, 4 * BPC))
        original = engine.blocks[:, :, src].copy()
        path.store(store_spec(tokens, src))
        path.load(load_spec(tokens, dst))
        np.testing.assert_array_equal(engine.blocks[:, :, dst], original)
        assert server.status()["l1"]["committed_bytes"] > 64 << 10
    finally:
        worker.shutdown()
        server.stop()


def test_upstreams_lazy_flags_make_a_lazy_pool() -> None:
    """Upstream's ``--l1-use-lazy --l1-init-size-gb N`` (its default is lazy too) means the
    same here: a pool that starts with N GiB."""
    server = start_server("--l1-size-gb", "0.25", "--l1-use-lazy", "--l1-init-size-gb", "0.0625")
    try:
        l1 = server.status()["l1"]
        assert (l1["committed_bytes"], l1["capacity_bytes"]) == (64 << 20, 256 << 20)
        assert "starts with 0.06 GiB (--l1-init-size-gb) and grows" in server.log()
    finally:
        server.stop()
