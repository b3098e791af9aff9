"""What each policy adds to the contract: ARC adapts, IsolatedLRU isolates salts and
applies quota changes, and the watermark thread frees room in the background."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pytest

from lmcache.errors import QuotaError
from lmcache.server.quotas import QuotaTable
from lmcache.server.watermark import WatermarkEvictor
from lmcache.storage.eviction import ARC, AccessStats, IsolatedLRU, make_policy
from lmcache.storage.eviction.arc import MAX_GHOSTS
from lmcache.storage.l1 import L1Cache, WriteSlot
from lmcache.types import ObjectKey

PAGE = 4096
GiB = 1 << 30


def key(i: int) -> ObjectKey:
    return ObjectKey(i.to_bytes(48, "big"))


def put(l1: L1Cache, i: int, salt: str = "", pages: int = 1) -> bool:
    slot = l1.reserve_write(key(i), pages * PAGE, salt=salt)
    return isinstance(slot, WriteSlot) and l1.commit_write(slot)


@pytest.mark.parametrize(("name", "survive"), [("ARC", True), ("LRU", False)])
def test_arc_a_scan_does_not_flush_frequently_used_chunks(name: str, survive: bool) -> None:
    l1 = L1Cache(np.zeros(8 * PAGE, dtype=np.uint8), make_policy(name))
    hot = range(4)
    for i in hot:
        assert put(l1, i)
    for _ in range(2):
        l1.touch([key(i) for i in hot])
    for i in range(100, 160):  # a scan of one-off chunks, three times the cache
        assert put(l1, i)
    assert all(l1.contains(key(i)) for i in hot) is survive


def test_arc_ghost_hits_move_the_target_and_ghosts_stay_bounded() -> None:
    arc: ARC[int] = ARC()
    stats = AccessStats(0, 0)
    for i in range(4):
        arc.on_insert(i, stats)
    victim = next(arc.victims())  # T1's oldest
    arc.on_remove(victim, evicted=True)
    assert arc.describe()["b1"] == 1 and arc.p == 0
    arc.on_insert(victim, stats)  # back while a ghost: recency was short of room
    assert arc.p >= 1 and arc.describe()["t2"] == 1 and arc.describe()["b1"] == 0
    for i in range(10, 10 + 5000):  # churn: ghosts never outgrow the cache they shadow
        arc.on_insert(i, stats)
        v = next(arc.victims())
        arc.on_remove(v, evicted=True)
        d = arc.describe()
        assert d["b1"] + d["b2"] <= 2 * d["c"] <= 2 * MAX_GHOSTS


def test_isolated_lru_a_salt_never_evicts_another_salts_chunks() -> None:
    policy: IsolatedLRU[Any] = IsolatedLRU()
    l1 = L1Cache(np.zeros(8 * PAGE, dtype=np.uint8), policy)
    policy.set_quota("a", 3 * PAGE)
    policy.set_quota("b", 8 * PAGE)
    assert put(l1, 100, "b", pages=5)  # b holds 5 of 8 pages
    for i in range(6):  # a writes 6 one-page chunks: its own oldest go (quota 3)
        assert put(l1, i, "a")
    assert [i for i in range(6) if l1.contains(key(i))] == [3, 4, 5]
    assert l1.contains(key(100)) and l1.salt_bytes("a") == 3 * PAGE
    policy.set_quota("a", 8 * PAGE)  # now the pool, not the quota, is the limit...
    assert put(l1, 6, "a")
    assert [i for i in range(7) if l1.contains(key(i))] == [4, 5, 6]  # ...its own go again
    assert l1.contains(key(100))
    assert l1.reserve_write(key(7), PAGE, salt="c") == "no_space"  # no quota: 0 bytes
    lease = l1.acquire_all([key(4), key(5), key(6)], owner="pin")
    assert l1.reserve_write(key(8), PAGE, salt="a") == "no_space"  # b's chunk is not an option
    assert lease is not None and l1.release(lease)
    assert l1.contains(key(100))


def test_isolated_lru_quota_changes_apply_at_once() -> None:
    policy: IsolatedLRU[Any] = IsolatedLRU(default_limit=PAGE)
    l1 = L1Cache(np.zeros(8 * PAGE, dtype=np.uint8), policy)
    table = QuotaTable(l1)
    assert put(l1, 0) and put(l1, 1)  # the default: one page for any salt...
    assert not l1.contains(key(0)) and l1.salt_bytes("") == PAGE  # ...so 0 made room
    table.set("_default", 4 * PAGE / GiB)  # `_default` is the empty salt
    for i in range(2, 5):
        assert put(l1, i)
    assert table.get("_default")["used_gb"] == 4 * PAGE / GiB
    assert table.set("_default", 2 * PAGE / GiB)["evicted"] == 2
    assert [i for i in range(5) if l1.contains(key(i))] == [3, 4]
    assert table.delete("_default")["evicted"] == 1  # back to the default: one page
    with pytest.raises(QuotaError) as missing:
        table.get("_default")
    assert missing.value.status == 404
    listed = table.list()
    assert listed["quotas"] == [] and listed["default_limit_gb"] == PAGE / GiB


def test_quotas_are_refused_with_another_policy() -> None:
    table = QuotaTable(L1Cache(np.zeros(8 * PAGE, dtype=np.uint8), make_policy("LRU")))
    with pytest.raises(QuotaError, match="only with --eviction-policy IsolatedLRU") as err:
        table.set("a", 1.0)
    assert err.value.status == 409


def test_watermark_frees_down_to_the_target_skipping_pinned() -> None:
    l1 = L1Cache(np.zeros(10 * PAGE, dtype=np.uint8), make_policy("LRU"))
    for i in range(9):
        assert put(l1, i)
    lease = l1.acquire_all([key(0)], owner="pin")
    evictor = WatermarkEvictor(l1, watermark=0.8, ratio=0.3, interval_s=60)
    assert evictor.tick() == 4  # 9 pages -> 5 (0.5 of 10)
    assert l1.usage()[0] == 5 * PAGE and l1.contains(key(0))
    assert evictor.tick() == 0 and evictor.runs == 1  # below the watermark: nothing
    assert lease is not None and l1.release(lease)


def test_watermark_thread_survives_a_failing_tick(caplog: pytest.LogCaptureFixture) -> None:
    l1 = L1Cache(np.zeros(10 * PAGE, dtype=np.uint8), make_policy("LRU"))
    evictor = WatermarkEvictor(l1, watermark=0.5, ratio=0.2, interval_s=0.01)
    calls = {"n": 0}
    real = l1.usage

    def broken() -> tuple[int, int]:
        calls["n"] += 1
        if calls["n"] <= 5:
            raise RuntimeError("boom")
        return real()

    l1.usage = broken  # type: ignore[method-assign]
    for i in range(8):
        assert put(l1, i)
    with caplog.at_level(logging.INFO, logger="lmcache.server"):
        evictor.start()
        deadline = time.monotonic() + 10
        while evictor.evicted == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        evictor.stop()
    assert (
        evictor.errors == 5 and evictor.evicted == 5 and evictor.last_error == "RuntimeError: boom"
    )
    failures = [r for r in caplog.records if "watermark eviction failed" in r.getMessage()]
    assert len(failures) == 1  # logged once, not per tick
    assert any("above watermark 0.50; triggering eviction." in r.getMessage()
               for r in caplog.records)  # fmt: skip
