"""Unit tests of storage logic: allocator, L1 states and pins, chunk keys."""

from __future__ import annotations

import time

import numpy as np
import pytest

from lmcache.storage.allocator import PageAllocator
from lmcache.storage.eviction import make_policy
from lmcache.storage.eviction.heap import HeapPolicy
from lmcache.storage.keys import ChunkHasher, Namespace, object_key
from lmcache.storage.l1 import L1Cache, WriteSlot
from lmcache.storage.l1_objects import Lease
from lmcache.types import ObjectKey

PAGE = 4096


def key(i: int) -> ObjectKey:
    return ObjectKey(i.to_bytes(48, "big"))


def test_allocator_coalesces_and_rejects_double_free() -> None:
    a = PageAllocator(10 * PAGE, PAGE)
    x, y, z = (a.allocate(3 * PAGE) for _ in range(3))
    assert x and y and z and a.allocate(2 * PAGE) is None
    a.free(y)
    assert a.largest_free_bytes == 3 * PAGE
    a.free(x)
    assert a.largest_free_bytes == 6 * PAGE and a.free_extents == 2
    with pytest.raises(ValueError, match="double free"):
        a.free(x)
    a.free(z)
    assert a.used_bytes == 0 and a.largest_free_bytes == 10 * PAGE and a.free_extents == 1


def test_allocator_mixed_sizes_coexist() -> None:
    a = PageAllocator(64 * PAGE, PAGE)
    small = [a.allocate(PAGE + 1) for _ in range(8)]  # 2 pages each
    big = a.allocate(40 * PAGE)
    assert all(small) and big is not None
    offsets = sorted(e.offset for e in [*small, big] if e)
    assert len(set(offsets)) == 9


def make_l1(pages: int, policy: str = "LRU") -> L1Cache:
    return L1Cache(np.zeros(pages * PAGE, dtype=np.uint8), make_policy(policy))


def put(l1: L1Cache, k: ObjectKey, fill: int = 1) -> WriteSlot:
    slot = l1.reserve_write(k, PAGE)
    assert isinstance(slot, WriteSlot)
    l1.view(slot.offset, slot.nbytes)[:] = fill
    assert l1.commit_write(slot)
    return slot


def test_reserve_reports_cached_and_no_space() -> None:
    l1 = make_l1(2)
    put(l1, key(1))
    assert l1.reserve_write(key(1), PAGE) == "cached"
    put(l1, key(2))
    lease = l1.acquire_prefix([[key(1)], [key(2)]], owner="r")
    assert lease.hit_groups == 2
    assert l1.reserve_write(key(3), PAGE) == "no_space"  # both pinned
    l1.release(lease, [key(1)])
    assert isinstance(l1.reserve_write(key(3), PAGE), WriteSlot)  # evicts key 1
    assert not l1.contains(key(1)) and l1.contains(key(2))


def test_writing_objects_are_invisible_and_not_evictable() -> None:
    l1 = make_l1(1)
    slot = l1.reserve_write(key(1), PAGE)
    assert isinstance(slot, WriteSlot)
    assert not l1.contains(key(1))
    assert l1.acquire_prefix([[key(1)]], owner="r").hit_groups == 0
    assert l1.reserve_write(key(2), PAGE) == "no_space"
    l1.abort_write(slot)
    assert l1.stats()["used_bytes"] == 0


def test_clear_during_a_copy_frees_pages_only_after_it() -> None:
    l1 = make_l1(2)
    put(l1, key(1))
    transfer = l1.acquire_all([key(1)], owner="retrieve")
    assert transfer is not None
    hold = l1.acquire_prefix([[key(1)]], owner="lookup", ttl=60)
    assert l1.clear() == 1
    stats = l1.stats()
    assert stats["objects"] == 0 and stats["used_bytes"] == PAGE and stats["doomed_pending"] == 1
    # The cleared pages are not handed out while the copy still reads them.
    other = l1.reserve_write(key(2), 2 * PAGE)
    assert other == "no_space"
    assert l1.release(transfer) is False  # the copy learns its data was cleared
    assert l1.stats()["used_bytes"] == 0
    assert l1.release(hold) is True  # the lookup's pins were already dropped by clear
    assert l1.stats()["used_bytes"] == 0


def test_clear_during_a_write_fails_the_commit() -> None:
    l1 = make_l1(2)
    slot = l1.reserve_write(key(1), PAGE)
    assert isinstance(slot, WriteSlot)
    l1.clear()
    assert l1.commit_write(slot) is False
    assert not l1.contains(key(1)) and l1.stats()["used_bytes"] == 0


def test_lease_and_remote_write_ttl() -> None:
    l1 = make_l1(2)
    put(l1, key(1))
    l1.acquire_prefix([[key(1)]], owner="dead-engine", ttl=0.01)
    slot = l1.reserve_write(key(2), PAGE, ttl=0.01)
    assert isinstance(slot, WriteSlot)
    time.sleep(0.02)
    assert l1.expire() == (1, 1)
    stats = l1.stats()
    assert stats["locked"] == 0 and stats["leases"] == 0
    # The late writer's pages stay reserved (it may still be copying into them) ...
    assert stats["used_bytes"] == 2 * PAGE and not l1.contains(key(2))
    other = l1.reserve_write(key(3), PAGE)  # ... so nobody else gets them (key 1 goes)
    assert isinstance(other, WriteSlot) and other.offset != slot.offset
    assert l1.reserve_write(key(4), PAGE) == "no_space"
    assert l1.commit_write(slot) is False  # too late: not stored, and its pages are freed
    assert l1.stats()["used_bytes"] == PAGE


@pytest.mark.parametrize("policy", ["LRU", "LFU", "FIFO"])
def test_hits_never_grow_the_eviction_heap(policy: str) -> None:
    l1 = make_l1(4, policy)
    for i in range(4):
        put(l1, key(i))
    for _ in range(5000):
        l1.touch([key(0), key(1)])
        l1.release(l1.acquire_prefix([[key(2)], [key(3)]], owner="r"))
    heap = l1.policy.describe()["heap_entries"]
    assert heap == 4  # one entry per object: hits only bump access stats
    put(l1, key(9))
    assert l1.stats()["evictions"] == 1


@pytest.mark.parametrize("policy", ["LRU", "LFU", "FIFO"])
def test_lazy_eviction_picks_the_policys_minimum(policy: str) -> None:
    """Random puts, lookups and pins: every eviction takes the unpinned object with the
    smallest current priority, exactly as an eager heap would."""
    rng = np.random.default_rng(7)
    l1 = make_l1(8, policy)
    leases: list[Lease] = []
    next_key = 0
    for _ in range(3000):
        live = list(l1._index)
        op = rng.integers(0, 4)
        if op == 0 and live:  # a lookup that keeps its pins for a while
            picks = [live[i] for i in rng.choice(len(live), size=min(2, len(live)))]
            leases.append(l1.acquire_prefix([[k] for k in picks], owner="hold"))
        elif op == 1 and leases:
            l1.release(leases.pop(int(rng.integers(0, len(leases)))))
        elif op == 2 and live:
            l1.touch([live[int(rng.integers(0, len(live)))]])
        else:
            candidates = [o for o in l1._index.values() if o.pins == 0]
            assert isinstance(l1.policy, HeapPolicy)  # LRU, LFU and FIFO: a priority function
            priority = l1.policy.priority
            expected = (
                min(candidates, key=lambda o: priority(o.stats)).key
                if len(live) == 8 and candidates
                else None
            )
            before = set(l1._index)
            slot = l1.reserve_write(key(next_key), PAGE)
            next_key += 1
            if not isinstance(slot, WriteSlot):
                assert slot == "no_space" and not candidates
                continue
            assert l1.commit_write(slot)
            evicted = before - set(l1._index)
            assert evicted == ({expected} if expected is not None else set())
        assert l1.policy.describe()["heap_entries"] == len(l1._index)


def test_recent_prompt_hash_chains_are_reused_and_exact() -> None:
    hasher = ChunkHasher(4)
    fresh = ChunkHasher(4, cache_bytes=0)  # no cache: the reference
    a = np.arange(20, dtype="<u4").tobytes()
    # A lookup that stops at its first miss caches the chunks it hashed ...
    it = hasher.iter_hashes(a, 5)
    assert next(it) == fresh.hashes(a, 1)[0]
    del it
    assert hasher._cache.get(a) == tuple(fresh.hashes(a, 1))
    # ... a later call continues the chain from there, and shorter calls reuse it.
    assert hasher.hashes(bytes(bytearray(a)), 5) == fresh.hashes(a, 5)
    assert len(hasher._cache.get(a)) == 5
    assert hasher.hashes(a, 3) == fresh.hashes(a, 3)
    # Same length and same last 64 tokens, another first token: a fingerprint
    # collision must recompute, never reuse the other prompt's chain.
    long = np.arange(400, dtype="<u4")
    b, c = long.tobytes(), long.copy()
    c[0] = 999
    assert hasher.hashes(b, 100) == fresh.hashes(b, 100)
    assert hasher.hashes(c.tobytes(), 100) == fresh.hashes(c.tobytes(), 100)
    assert hasher.hashes(b, 100) == fresh.hashes(b, 100)
    # Mutable buffers are never cached (their bytes could change under the entry).
    buf = bytearray(np.arange(8, 16, dtype="<u4").tobytes())
    assert hasher.hashes(buf, 2) == fresh.hashes(bytes(buf), 2)  # type: ignore[arg-type]
    assert hasher._cache.get(bytes(buf)) == ()


def test_hash_chain_cache_is_bounded_by_bytes() -> None:
    hasher = ChunkHasher(4, cache_bytes=20_000)
    prompts = [np.arange(i, i + 256, dtype="<u4").tobytes() for i in range(100)]
    for p in prompts:
        hasher.hashes(p, 64)
    cache = hasher._cache
    assert 0 < len(cache) < 100 and cache._bytes <= 20_000
    assert cache.get(prompts[-1]) and not cache.get(prompts[0])  # least recently used go
    ChunkHasher(4, cache_bytes=100).hashes(prompts[0], 64)  # bigger than the cache: skipped


def test_chained_hashes_depend_on_every_earlier_token() -> None:
    hasher = ChunkHasher(4)
    a = np.arange(12, dtype="<u4").tobytes()
    b = bytearray(a)
    b[0] ^= 1
    ha, hb = hasher.hashes(a, 3), hasher.hashes(bytes(b), 3)
    assert all(x != y for x, y in zip(ha, hb, strict=True))
    assert hasher.hashes(a + a, 3) == ha  # the tail does not matter
    assert ChunkHasher(4, "blake2b").hashes(a, 3) != ha
    with pytest.raises(ValueError, match="need 16 tokens"):
        hasher.hashes(a, 4)


def test_namespaces_separate_keys() -> None:
    h = ChunkHasher(4).hashes(np.arange(4, dtype="<u4").tobytes(), 1)[0]
    base = Namespace("m", 2, 0, "bf16", "", "")
    variants = [
        base,
        Namespace("m", 2, 1, "bf16", "", ""),
        Namespace("m", 1, 0, "bf16", "", ""),
        Namespace("m2", 2, 0, "bf16", "", ""),
        Namespace("m", 2, 0, "fp32", "", ""),
        Namespace("m", 2, 0, "bf16", "x", ""),
        Namespace("m", 2, 0, "bf16", "", "salt"),
    ]
    keys = {object_key(ns.digest, h) for ns in variants}
    assert len(keys) == len(variants) and all(len(k) == 48 for k in keys)
