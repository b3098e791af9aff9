"""One contract for every eviction policy (cachetools style: a new policy in `POLICIES` is
tested by adding it there). The L1 relies on two promises of a policy, and promises one
thing itself whatever the policy:

- a priority never decreases when its object is accessed (the heap is re-sorted lazily);
- a priority depends only on `AccessStats` (no hidden state);
- the L1 never evicts a pinned chunk, and evicts the policy's minimum among the rest.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmcache.storage.eviction import POLICIES, AccessStats, make_policy
from lmcache.storage.l1 import L1Cache, Lease, WriteSlot
from lmcache.types import ObjectKey

PAGE = 4096
stats_st = st.builds(
    lambda created, age, hits: AccessStats(created, created + age, hits),
    st.integers(1, 10**6), st.integers(0, 10**6), st.integers(0, 10**4),
)  # fmt: skip


@pytest.fixture(params=sorted(POLICIES))
def name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def key(i: int) -> ObjectKey:
    return ObjectKey(i.to_bytes(48, "big"))


@settings(max_examples=200, deadline=None)
@given(stats=stats_st, later=st.integers(1, 10**6))
def test_an_access_never_lowers_the_priority(stats: AccessStats, later: int) -> None:
    for name in POLICIES:
        policy = make_policy(name)
        before = policy.priority(stats)
        touched = AccessStats(stats.created, stats.last_access + later, stats.hits + 1)
        assert policy.priority(touched) >= before, name
        assert policy.priority(stats) == before, f"{name} has hidden state"


def test_names_are_case_insensitive_and_unknown_names_say_the_choices(name: str) -> None:
    assert make_policy(name.lower()).name == name
    with pytest.raises(ValueError, match=", ".join(POLICIES)):
        make_policy("MRU")


@settings(max_examples=40, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from("wpuh"), st.integers(0, 11)), max_size=120))
def test_pinned_chunks_survive_and_the_minimum_goes(ops: list[tuple[str, int]]) -> None:
    """Random writes (w), pins (p), unpins (u) and hits (h) on an L1 of 4 pages."""
    for name in POLICIES:
        policy = make_policy(name)
        l1 = L1Cache(np.zeros(4 * PAGE, dtype=np.uint8), policy)
        pins: dict[int, Lease] = {}
        for op, i in ops:
            if op == "w":
                present = {j for j in range(12) if l1.contains(key(j))}
                expected_victim = _policy_minimum(l1, present - set(pins))
                slot = l1.reserve_write(key(i), PAGE)
                if isinstance(slot, WriteSlot):
                    l1.commit_write(slot)
                    gone = present - {j for j in range(12) if l1.contains(key(j))}
                    assert not gone & set(pins), f"{name} evicted a pinned chunk"
                    assert gone <= {expected_victim}, f"{name} evicted {gone}, not the minimum"
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


def _policy_minimum(l1: L1Cache, candidates: set[int]) -> int | None:
    """The unpinned chunk the policy ranks lowest, read through the L1's own records
    (priorities are unique: every policy orders by a logical clock last)."""
    ranked = [
        (l1.policy.priority(obj.stats), j)
        for j in candidates
        if (obj := l1._index.get(key(j))) is not None
    ]
    return min(ranked)[1] if ranked else None


def test_the_policys_minimum_stays_while_pinned(name: str) -> None:
    l1 = L1Cache(np.zeros(4 * PAGE, dtype=np.uint8), make_policy(name))
    for i in range(4):
        slot = l1.reserve_write(key(i), PAGE)
        assert isinstance(slot, WriteSlot) and l1.commit_write(slot)
    l1.touch([key(0), key(0), key(2)])  # some history, so the policies disagree
    first = _policy_minimum(l1, {0, 1, 2, 3})
    assert first is not None
    lease = l1.acquire_all([key(first)], owner="reader")
    assert lease is not None
    second = _policy_minimum(l1, {0, 1, 2, 3} - {first})
    slot = l1.reserve_write(key(9), PAGE)
    assert isinstance(slot, WriteSlot)
    assert l1.contains(key(first)), "a pinned chunk was evicted"
    assert not l1.contains(key(second)) and l1.evictions == 1
    l1.release(lease)
