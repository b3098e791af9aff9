"""One contract for every eviction policy (a new policy in `POLICIES` is tested by adding
it there), run against the policy alone and against each cache that uses it (the L1 and
the L2 adapters' `CapacityIndex`). What a cache relies on:

- walking `victims` without removing anything changes nothing (the same order again);
- a full walk offers every tracked handle exactly once, and never one that was removed;
- removing the victim just offered (``evicted=True``) lets the walk go on to the next;
- priority policies: a priority never drops on access and depends only on the stats.

What a cache promises whatever the policy: it never evicts a pinned chunk, and it
evicts the policy's first unpinned victim.
"""

from __future__ import annotations

from contextlib import closing
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmcache.storage.capacity import CapacityIndex
from lmcache.storage.eviction import (
    L2_POLICIES,
    POLICIES,
    AccessStats,
    EvictionPolicy,
    HeapPolicy,
    canonical_name,
    make_policy,
)
from lmcache.storage.l1 import L1Cache, Lease, WriteSlot
from lmcache.types import ObjectKey

PAGE = 4096
BIG = 1 << 40  # IsolatedLRU's default quota in the generic suites: it behaves as an LRU
stats_st = st.builds(
    lambda created, age, hits: AccessStats(created, created + age, hits),
    st.integers(1, 10**6), st.integers(0, 10**6), st.integers(0, 10**4),
)  # fmt: skip
HEAP = [n for n in POLICIES if isinstance(make_policy(n), HeapPolicy)]
EVICTING = [n for n in POLICIES if n != "noop"]


def policy(name: str) -> EvictionPolicy[Any]:
    return make_policy(name, default_limit=BIG)


def key(i: int) -> ObjectKey:
    return ObjectKey(i.to_bytes(48, "big"))


def walk(p: EvictionPolicy[Any], salt: str | None = None) -> list[Any]:
    with closing(p.victims(salt)) as victims:
        return list(victims)


@pytest.fixture(params=POLICIES)
def name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# ----- the policy alone ----------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(stats=stats_st, later=st.integers(1, 10**6))
def test_an_access_never_lowers_a_priority(stats: AccessStats, later: int) -> None:
    for name in HEAP:
        p = make_policy(name)
        assert isinstance(p, HeapPolicy)
        before = p.priority(stats)
        touched = AccessStats(stats.created, stats.last_access + later, stats.hits + 1)
        assert p.priority(touched) >= before, name
        assert p.priority(stats) == before, f"{name} has hidden state"


@settings(max_examples=60, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from("iarv"), st.integers(0, 15)), max_size=150))
def test_walks_change_nothing_and_offer_each_handle_once(ops: list[tuple[str, int]]) -> None:
    """Random inserts (i), accesses (a), removals (r) and evictions of the first victim (v)."""
    for name in POLICIES:
        p, live = policy(name), {}
        for clock, (op, i) in enumerate(ops, 1):
            if op == "i" and i not in live:
                live[i] = AccessStats(clock, clock)
                p.on_insert(i, live[i], salt=str(i % 2))
            elif op == "a" and i in live:
                live[i].last_access, live[i].hits = clock, live[i].hits + 1
                p.on_access(i)
            elif op == "r" and i in live:
                del live[i]
                p.on_remove(i)
            elif op == "v":
                with closing(p.victims()) as victims:
                    first = next(victims, None)
                    if first is not None:
                        del live[first]
                        p.on_remove(first, evicted=True)
                        assert next(victims, None) in (set(live) | {None}), name
            order = walk(p)
            assert order == walk(p), f"{name}: a walk changed the order"
            if name == "noop":
                assert order == []
            else:
                assert sorted(order) == sorted(live), f"{name}: offered {order}, has {live}"
                assert len(p) == len(live)


def test_names_are_case_insensitive_and_unknown_names_say_the_choices(name: str) -> None:
    assert make_policy(name.lower()).name == name == canonical_name(name.upper())
    with pytest.raises(ValueError, match=", ".join(POLICIES)):
        make_policy("MRU")
    with pytest.raises(ValueError, match=", ".join(L2_POLICIES)):
        make_policy("IsolatedLRU", choices=L2_POLICIES)


# ----- the L1 -------------------------------------------------------------------------


def _first_unpinned_victim(l1: L1Cache, pinned: set[int]) -> int | None:
    with closing(l1.policy.victims()) as victims:
        for obj in victims:
            j = int.from_bytes(obj.key, "big")
            if j not in pinned:
                return j
    return None


@settings(max_examples=30, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from("wpuh"), st.integers(0, 11)), max_size=120))
def test_l1_keeps_pinned_chunks_and_evicts_the_policys_first(ops: list[tuple[str, int]]) -> None:
    """Random writes (w), pins (p), unpins (u) and hits (h) on an L1 of 4 pages."""
    for name in POLICIES:
        l1 = L1Cache(np.zeros(4 * PAGE, dtype=np.uint8), policy(name))
        pins: dict[int, Lease] = {}
        for op, i in ops:
            if op == "w":
                present = {j for j in range(12) if l1.contains(key(j))}
                expected = _first_unpinned_victim(l1, set(pins))
                slot = l1.reserve_write(key(i), PAGE)
                if isinstance(slot, WriteSlot):
                    l1.commit_write(slot)
                    gone = present - {j for j in range(12) if l1.contains(key(j))}
                    assert not gone & set(pins), f"{name} evicted a pinned chunk"
                    assert gone <= {expected}, f"{name} evicted {gone}, not {expected}"
                elif name == "noop" and i not in present:
                    assert len(present) == 4 and slot == "no_space"
            elif op == "p" and i not in pins:
                lease = l1.acquire_all([key(i)], owner="t")
                if lease is not None:
                    pins[i] = lease
            elif op == "u" and i in pins:
                l1.release(pins.pop(i))
            elif op == "h":
                l1.touch([key(i)])
        for j in pins:
            assert l1.contains(key(j)), f"{name} lost pinned chunk {j}"


@pytest.mark.parametrize("name", EVICTING)
def test_the_policys_first_victim_stays_while_pinned(name: str) -> None:
    l1 = L1Cache(np.zeros(4 * PAGE, dtype=np.uint8), policy(name))
    for i in range(4):
        slot = l1.reserve_write(key(i), PAGE)
        assert isinstance(slot, WriteSlot) and l1.commit_write(slot)
    l1.touch([key(0), key(0), key(2)])  # some history, so the policies disagree
    first = _first_unpinned_victim(l1, set())
    assert first is not None
    lease = l1.acquire_all([key(first)], owner="reader")
    assert lease is not None
    second = _first_unpinned_victim(l1, {first})
    assert second is not None
    slot = l1.reserve_write(key(9), PAGE)
    assert isinstance(slot, WriteSlot)
    assert l1.contains(key(first)), "a pinned chunk was evicted"
    assert not l1.contains(key(second)) and l1.evictions == 1
    l1.release(lease)


@pytest.mark.parametrize("name", EVICTING)
def test_evict_to_frees_down_to_the_target_in_policy_order(name: str) -> None:
    l1 = L1Cache(np.zeros(10 * PAGE, dtype=np.uint8), policy(name))
    for i in range(10):
        slot = l1.reserve_write(key(i), PAGE)
        assert isinstance(slot, WriteSlot) and l1.commit_write(slot)
    lease = l1.acquire_all([key(0)], owner="pin")
    expected = walk(l1.policy)
    assert l1.evict_to(6 * PAGE, batch=2) == 4
    assert l1.usage() == (6 * PAGE, 10 * PAGE) and l1.contains(key(0))
    gone = [o for o in expected if o.key != key(0)][:4]
    assert not any(l1.contains(o.key) for o in gone)
    assert lease is not None and l1.release(lease)


def test_noop_never_evicts() -> None:
    l1 = L1Cache(np.zeros(2 * PAGE, dtype=np.uint8), make_policy("noop"))
    for i in range(2):
        slot = l1.reserve_write(key(i), PAGE)
        assert isinstance(slot, WriteSlot) and l1.commit_write(slot)
    assert l1.reserve_write(key(5), PAGE) == "no_space"
    assert l1.evict_to(0) == 0 and l1.evictions == 0
    assert l1.remove([key(0)], force=False) == (1, 0)  # an operator still can
    assert isinstance(l1.reserve_write(key(5), PAGE), WriteSlot)


# ----- the L2 adapters' CapacityIndex ----------------------------------------------------


@pytest.mark.parametrize("name", L2_POLICIES)
def test_capacity_index_evicts_in_policy_order_and_keeps_the_newcomer(name: str) -> None:
    index = CapacityIndex[int](make_policy(name, choices=L2_POLICIES), capacity_bytes=4)
    for i in range(4):
        assert index.put(i, 1) == []
    index.touch(0)
    index.touch(0)
    index.touch(2)
    expected = walk(index.policy)[:2]
    evicted = index.put(9, 2)
    assert [k for k, _ in evicted] == expected and 9 in index
    assert index.bytes == 4 and len(index) == 3
    rest = [(k, 2 if k == 9 else 1) for k in walk(index.policy)]
    evicted = index.put(10, 9)
    assert sorted(evicted[:-1]) == sorted(rest) and evicted[-1] == (10, 9)  # alone: it goes
    assert len(index) == 0 and index.bytes == 0
