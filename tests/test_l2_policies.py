"""Tier policies (`lmcache.storage.l2.policies`): one contract per interface, run against
every implementation, then the tiered store following a prefetch policy end to end."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import pytest

from lmcache.protocol.messages import (
    KVLayout,
    LayerPlacement,
    Lookup,
    LookupReply,
    Ok,
    QueryLookup,
    RegisterKV,
    StoreBytes,
    StoreReply,
    WorkerCopy,
)
from lmcache.server.build import build
from lmcache.server.metrics import Metrics
from lmcache.server.registry import EngineRegistry
from lmcache.settings import ServerSettings
from lmcache.storage.l2.base import L2Adapter
from lmcache.storage.l2.memory import MemoryL2
from lmcache.storage.l2.policies import (
    PREFETCH_POLICIES,
    STORE_POLICIES,
    Fastest,
    PrefetchPolicy,
    StorePolicy,
)
from lmcache.transport.zmq_server import Deferred
from lmcache.types import ObjectKey

from .conftest import MODEL, unique_tokens


def tiers(n: int) -> list[L2Adapter]:
    return [MemoryL2(name=f"t{i}") for i in range(n)]


def down(*names: str) -> Callable[[L2Adapter], bool]:
    return lambda a: a.name not in names


@pytest.fixture(params=sorted(STORE_POLICIES))
def store_policy(request: pytest.FixtureRequest) -> StorePolicy:
    return STORE_POLICIES[request.param]()


@pytest.fixture(params=sorted(PREFETCH_POLICIES))
def prefetch_policy(request: pytest.FixtureRequest) -> PrefetchPolicy:
    return PREFETCH_POLICIES[request.param]()


class TestStorePolicyContract:
    def test_writes_only_to_tiers_that_are_up(self, store_policy: StorePolicy) -> None:
        ts = tiers(3)
        assert all(a.name != "t0" for a in store_policy.targets(ts, down("t0")))
        assert store_policy.targets(ts, down("t0", "t1", "t2")) == []

    def test_writes_somewhere_while_a_tier_is_up(self, store_policy: StorePolicy) -> None:
        ts = tiers(3)
        for dead in [(), ("t0",), ("t0", "t2")]:
            targets = store_policy.targets(ts, down(*dead))
            assert targets and len({a.name for a in targets}) == len(targets)


class TestPrefetchPolicyContract:
    def test_asks_every_tier_that_is_up_once(self, prefetch_policy: PrefetchPolicy) -> None:
        ts = tiers(3)
        prefetch_policy.observe(ts[2], 1 << 20, 0.001)
        prefetch_policy.observe(ts[0], 1 << 20, 0.1)
        assert sorted(a.name for a in prefetch_policy.order(ts, down())) == ["t0", "t1", "t2"]
        assert sorted(a.name for a in prefetch_policy.order(ts, down("t1"))) == ["t0", "t2"]

    def test_ignores_empty_observations(self, prefetch_policy: PrefetchPolicy) -> None:
        ts = tiers(2)
        prefetch_policy.observe(ts[0], 0, 0.0)
        prefetch_policy.observe(ts[1], 10, 0.0)
        assert [a.name for a in prefetch_policy.order(ts, down())] == ["t0", "t1"]


def test_fastest_tries_each_tier_once_then_follows_the_measured_speed() -> None:
    policy, (a, b, c) = Fastest(weight=0.5), tiers(3)
    assert [t.name for t in policy.order([a, b, c], down())] == ["t0", "t1", "t2"]
    policy.observe(a, 10**9, 1.0)  # 1 GB/s
    assert [t.name for t in policy.order([a, b, c], down())] == ["t1", "t2", "t0"]
    policy.observe(b, 10**9, 0.5)  # 2 GB/s
    policy.observe(c, 10**9, 2.0)  # 0.5 GB/s
    assert [t.name for t in policy.order([a, b, c], down())] == ["t1", "t0", "t2"]
    policy.observe(c, 10**9, 0.125)  # 8 GB/s now: the average moves half way, to 4.25
    assert [t.name for t in policy.order([a, b, c], down())] == ["t2", "t1", "t0"]
    assert policy.speeds() == {"t0": 1.0, "t1": 2.0, "t2": 4.25}


class SlowL2(MemoryL2):
    """A tier whose reads take ``delay`` seconds more (a busy disk, a far Redis)."""

    def __init__(self, name: str, delay: float) -> None:
        super().__init__(name=name)
        self.delay = delay

    def get_into(self, key: ObjectKey, out: memoryview) -> bool:
        time.sleep(self.delay)
        return super().get_into(key, out)


def test_the_tiered_store_reads_from_the_tier_the_policy_ranks_first() -> None:
    """Both tiers hold every chunk (--l2-store-policy all). `fastest` reads the first round
    from the slow tier listed first, the second from the other (not measured yet), and from
    then on only from the fast one; `/status` shows the speeds it ranks by."""
    c = 4
    slow, fast = SlowL2("slow", 0.02), MemoryL2(name="fast")
    core = build(
        ServerSettings(chunk_size=c, l2_prefetch_policy="fastest"),
        np.zeros(1 << 20, dtype=np.uint8),
        registry=EngineRegistry(c), metrics=Metrics(dict), adapters=[slow, fast],
    )  # fmt: skip
    assert core.tiers is not None
    core.tiers.start()
    h = core.handler
    try:
        layout = KVLayout(
            num_layers=1, num_blocks=8, block_size=c, block_bytes=64, block_stride=64,
            layers=[LayerPlacement(0, 0)],
        )  # fmt: skip
        assert h.dispatch(RegisterKV(id=1, instance_id=1, layout=layout, memory=WorkerCopy(),
                                     rank=0, **MODEL)) == Ok(id=1)  # fmt: skip
        tokens = unique_tokens(2 * c).astype("<u4").tobytes()
        req = StoreBytes(id=2, request_id="s", instance_id=1, tokens=tokens, start=0, end=2 * c)
        work = h.dispatch(req, [memoryview(bytes([7]) * 64)] * 2)
        assert isinstance(work, Deferred) and isinstance(work.run(), StoreReply)
        deadline = time.monotonic() + 10
        while core.tiers.status()[0]["stored_objects"] < 4:  # 2 chunks x 2 tiers
            assert time.monotonic() < deadline
            time.sleep(0.01)

        tiers = core.tiers

        def hits() -> list[int]:
            return [a["hits"] for a in tiers.status()]

        for round_, expected in enumerate([[2, 0], [2, 2], [2, 4], [2, 6]]):
            core.store.clear()
            rid = f"r{round_}"
            lookup = Lookup(id=3, request_id=rid, tokens=tokens, **MODEL)
            assert h.dispatch(lookup) == LookupReply(id=3, hit_tokens=None)  # prefetching
            pending = LookupReply(id=4, hit_tokens=None)
            while (reply := h.dispatch(QueryLookup(id=4, request_id=rid))) == pending:
                assert time.monotonic() < deadline + 20
                time.sleep(0.005)
            assert reply == LookupReply(id=4, hit_tokens=2 * c)
            h.sessions.end(rid)
            assert hits() == expected, round_
        speeds = {a["name"]: a["read_gbps"] for a in core.tiers.status()}
        assert speeds["fast"] > speeds["slow"] > 0
        assert {a["prefetch_policy"] for a in core.tiers.status()} == {"fastest"}
    finally:
        core.tiers.stop()
