"""KV events and stats of the vLLM connector, as logic: fakes for the server and vLLM's
request (the real vLLM and server: tests/vllm/test_vllm_reporting.py)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

from lmcache.errors import ServerError
from lmcache.integration.vllm.identity import CacheIdentity
from lmcache.integration.vllm.kv_events import (
    EventTally,
    RemovalWatch,
    RemovedBlocks,
    StoredBlocks,
    WorkerEvents,
    stored_blocks,
)
from lmcache.integration.vllm.metadata import Metadata, ParallelStrategy, StoreSpec
from lmcache.integration.vllm.stats import Tally, merged, summary
from lmcache.integration.vllm.transfer_paths import Held
from lmcache.integration.vllm.worker import WorkerSide
from lmcache.protocol.messages import KVEventRecord, KVEvents, KVLayout, LayerPlacement

from .test_connector_scheduler import FakeClient, FakeLink, blocks, step

BS = 128
IDENT = CacheIdentity("m", 1, "float32", "spec", BS)
HASHES = [bytes([i]) * 32 for i in range(8)]  # vLLM's BlockHash values are bytes


def event(first: int, last: int, salt: str = "") -> StoredBlocks | None:
    return stored_blocks(HASHES, list(range(1024)), first * BS, last * BS, BS, cache_salt=salt)


# ----- the event of a store ------------------------------------------------------------


def test_a_store_announces_its_blocks_chained_to_the_block_before() -> None:
    e = event(2, 5)
    assert e is not None
    assert e.block_hashes == tuple(HASHES[2:5]) and e.parent == HASHES[1]
    assert e.token_ids == tuple(range(2 * BS, 5 * BS))
    first = event(0, 2)
    assert first is not None and first.parent is None


def test_no_event_when_vllms_hashes_do_not_cover_the_range() -> None:
    assert event(6, 9) is None  # only 8 hashes
    assert stored_blocks(None, list(range(512)), 0, 256, BS) is None
    assert event(3, 3) is None


def test_a_prefix_is_what_a_store_short_of_space_held() -> None:
    e = event(0, 4)
    assert e is not None
    p = e.prefix(1)
    assert p is not None and p.block_hashes == (HASHES[0],) and p.token_ids == tuple(range(BS))
    assert e.prefix(0) is None and e.prefix(9) is e


def test_the_salt_is_an_extra_key_of_the_prompts_first_block_only() -> None:
    first, later = event(0, 2, "tenant"), event(2, 4, "tenant")
    assert first is not None and later is not None
    assert first.extra_keys() == [("tenant",), None] and later.extra_keys() == [None, None]


def test_vllm_form_medium_cpu_and_int_hashes() -> None:
    pytest.importorskip("vllm")
    from lmcache.integration.vllm.kv_events import to_vllm

    e = event(1, 3)
    assert e is not None
    (out,) = to_vllm([e])
    assert out.medium == "CPU" and out.ownership == "lmcache" and out.block_size == BS
    assert out.token_ids == list(range(BS, 3 * BS))
    assert len(out.block_hashes) == 2 and out.parent_block_hash is not None


# ----- across ranks and steps ------------------------------------------------------------


def test_an_event_is_ready_once_every_rank_reported_it() -> None:
    tally = EventTally(ranks=2)
    a, b = event(0, 2), event(2, 4)
    tally.add([a, b])
    assert tally.take() == []
    tally.add([b, "not ours"])  # another step: rank 1 finished b only
    assert tally.take() == [b]
    tally.add([a])
    assert tally.take() == [a] and tally.take() == []


def test_incomplete_events_are_bounded() -> None:
    tally = EventTally(ranks=2, limit=2)
    e0, e1, e2 = event(0, 1), event(1, 2), event(2, 3)
    tally.add([e0, e1, e2])  # e0 forgotten (as if a rank never stored it)
    tally.add([e1, e2])
    assert tally.take() == [e1, e2]
    tally.add([e0])  # counted afresh: one rank of two
    assert tally.take() == []


def test_worker_events_are_bounded_and_taken_once() -> None:
    events = WorkerEvents(limit=2)
    for e in (event(0, 1), None, event(1, 2), event(2, 3)):
        events.add(e)
    assert events.take() == [event(1, 2), event(2, 3)] and events.take() == []


# ----- the scheduler plans events and counts lookups ----------------------------------------


def scheduler(events: bool) -> Any:
    from lmcache.integration.vllm.scheduler import SchedulerSide

    client = FakeClient(hit=256)
    s = SchedulerSide(
        FakeLink(client),  # type: ignore[arg-type]
        IDENT, can_load=True, can_store=True, events=events,
    )  # fmt: skip
    return s


def store_of(s: Any, n: int) -> StoreSpec:
    req = SimpleNamespace(
        request_id="a", prompt_token_ids=list(range(n)), cache_salt=None, status=None,
        block_hashes=HASHES,
    )  # fmt: skip
    assert s.get_num_new_matched_tokens(req, 0) == (256, False)
    s.update_state_after_alloc(req, blocks(list(range(8))), 256)
    (spec,) = s.build_connector_meta(step([("a", list(range(8)), 256)], {"a": n - 256})).stores
    assert isinstance(spec, StoreSpec)
    return spec


def test_with_events_a_store_carries_vllms_hashes_of_its_blocks() -> None:
    spec = store_of(scheduler(events=True), 700)
    assert (spec.start, spec.end) == (256, 640)
    assert spec.event == event(2, 5)


def test_without_events_nothing_is_carried() -> None:
    s = scheduler(events=False)
    assert store_of(s, 700).event is None and s.events is None


def test_a_lookup_is_counted_once_it_is_answered() -> None:
    s = scheduler(events=False)
    store_of(s, 700)
    data = s.stats.take()
    assert data["lookup_tokens"] == 640 and data["hit_tokens"] == 256
    assert s.stats.take() is None


# ----- the worker announces what it stored and counts moves ------------------------------------


@dataclass
class FakePath:
    held: int | None = None  # tokens the server holds after a store (None: all)
    fail: bool = False
    asked_keys: list[bool] = field(default_factory=list)

    def store(self, spec: StoreSpec, *, want_keys: bool = False) -> Held:
        if self.fail:
            raise ServerError("boom")
        self.asked_keys.append(want_keys)
        chunks = -(-(spec.end - spec.start) // 256)
        keys = tuple(f"k{spec.start // 256 + i}".encode() for i in range(chunks))
        return Held(spec.end - spec.start if self.held is None else self.held, keys)

    def stage_load(self, spec: Any) -> None:  # None: copied already, as engine_driven
        if self.fail:
            raise ServerError("boom")


@dataclass
class FakeLog:
    """The server's KV event log, as `poll_kv_events` answers it."""

    records: list[KVEventRecord] = field(default_factory=list)
    log: str = "L"
    enabled: bool = True
    lost: bool = False
    polls: list[int] = field(default_factory=list)

    def poll_kv_events(self, after: int = 0) -> KVEvents:
        self.polls.append(after)
        new = [r for r in self.records if r.seq > after]
        nxt = new[-1].seq if new else after
        return KVEvents(
            id=1, log=self.log, enabled=self.enabled, next=nxt, lost=self.lost, records=new
        )

    def remove(self, key: bytes) -> None:
        self.records.append(KVEventRecord(len(self.records) + 1, "removed", key))


def worker(
    path: FakePath, *, events: bool = True, rank: int = 0, log: FakeLog | None = None
) -> WorkerSide:
    link = SimpleNamespace(
        chunk_size=256, healthy=True, instance_id=None, on_recover=None, client=log or FakeLog()
    )
    w = WorkerSide(
        link,  # type: ignore[arg-type]
        IDENT, ParallelStrategy(2, rank), "lmcache_driven", can_load=True, can_store=True,
        async_store=False, events=events, event_poll_s=0.01,
    )  # fmt: skip
    w._reg.path = path  # type: ignore[assignment]
    w._reg.layout = KVLayout(  # 2 layers, 1 KiB per block of a layer
        num_layers=2, num_blocks=8, block_size=BS, block_bytes=1024, block_stride=1024,
        layers=[LayerPlacement(0, 0), LayerPlacement(0, 8192)],
    )  # fmt: skip
    return w


def spec(first: int, last: int) -> StoreSpec:
    return StoreSpec(
        "a", list(range(last * BS)), first * BS, last * BS, list(range(first, last)),
        event=event(first, last),
    )  # fmt: skip


def test_a_finished_store_is_announced_and_counted() -> None:
    w = worker(FakePath())
    w.save(Metadata(stores=[spec(0, 4)]))
    assert w.take_events() == [event(0, 4)]
    time.sleep(0.02)
    assert w.take_events() == []
    data = w.stats.take()
    assert data is not None
    assert (data["store_tokens"], data["store_bytes"]) == (512, 4 * 2 * 1024)
    assert data["store_seconds"] > 0 and data["failed_stores"] == 0


def test_a_store_short_of_space_announces_what_the_server_holds() -> None:
    w = worker(FakePath(held=256))
    w.save(Metadata(stores=[spec(0, 4)]))
    assert w.take_events() == [event(0, 2)]


def test_a_failed_store_announces_nothing_and_counts_a_failure() -> None:
    w = worker(FakePath(fail=True))
    w.save(Metadata(stores=[spec(0, 4)]))
    assert w.take_events() == []
    data = w.stats.take()
    assert data is not None and data["failed_stores"] == 1 and data["store_tokens"] == 0


def test_without_events_the_worker_keeps_none() -> None:
    w = worker(FakePath(), events=False)
    w.save(Metadata(stores=[spec(0, 4)]))
    assert w.events is None and w.take_events() == []


def test_only_rank_zero_counts_tokens_every_rank_counts_bytes() -> None:
    w = worker(FakePath(), rank=1)
    w.save(Metadata(stores=[spec(0, 2)]))
    data = w.stats.take()
    assert data is not None and data["store_tokens"] == 0 and data["store_bytes"] == 2 * 2048


def test_loads_and_failed_loads_are_counted() -> None:
    from lmcache.integration.vllm.metadata import LoadSpec

    load = LoadSpec("a", list(range(512)), 0, 512, [0, 1, 2, 3], skip_tokens=128)
    w = worker(FakePath())
    w.start_load(Metadata(loads=[load]))
    data = w.stats.take()
    assert data is not None and (data["load_tokens"], data["load_bytes"]) == (384, 3 * 2048)
    w = worker(FakePath(fail=True))
    w.start_load(Metadata(loads=[load]))
    data = w.stats.take()
    assert data is not None and data["failed_loads"] == 1 and data["load_tokens"] == 0
    assert w.load_errors() == {1, 2, 3}


# ----- the counts as vLLM sums, logs and exports them ------------------------------------------


def test_tally_sums_and_summary() -> None:
    t = Tally()
    assert t.take() is None
    t.add(lookup_tokens=100, hit_tokens=25)
    t.add(lookup_tokens=100, load_bytes=2e9, load_seconds=0.5)
    data = t.take()
    assert data is not None and data["lookup_tokens"] == 200 and data["store_tokens"] == 0
    both = merged(data, data)
    assert both["hit_tokens"] == 50
    s = summary(both)
    assert s["hit_rate"] == 0.125 and s["load_gb_per_s"] == 4.0 and s["store_gb_per_s"] == 0
    with pytest.raises(KeyError):
        t.add(nonsense=1)


def test_vllm_stats_and_prometheus_counters() -> None:
    pytest.importorskip("vllm")
    import prometheus_client as prom

    from lmcache.integration.vllm.reporting import LMCacheConnectorStats, LMCachePromMetrics

    a = LMCacheConnectorStats(data={"lookup_tokens": 10, "hit_tokens": 5})
    b = LMCacheConnectorStats(data={"lookup_tokens": 10, "store_tokens": 256})
    assert LMCacheConnectorStats(data={}).is_empty() and not a.is_empty()
    total = a.aggregate(b)
    assert total.reduce()["lookup_tokens"] == 20 and total.reduce()["hit_rate"] == 0.25

    registry = prom.CollectorRegistry()

    class Counter(prom.Counter):
        def __init__(self, *args: Any, **kw: Any) -> None:
            super().__init__(*args, **{**kw, "registry": registry})

    config = SimpleNamespace(kv_transfer_config=None)
    metrics = LMCachePromMetrics(
        config, {prom.Gauge: prom.Gauge, prom.Counter: Counter, prom.Histogram: prom.Histogram},
        ["engine"], {0: ["0"]},
    )  # fmt: skip
    metrics.observe(total.data, engine_idx=0)
    metrics.observe({"store_tokens": 256}, engine_idx=0)
    metrics.observe({"store_tokens": 1}, engine_idx=7)  # an unknown engine: ignored
    value = registry.get_sample_value
    assert value("vllm:lmcache_store_tokens_total", {"engine": "0"}) == 512
    assert value("vllm:lmcache_lookup_tokens_total", {"engine": "0"}) == 20
    assert value("vllm:lmcache_failed_loads_total", {"engine": "0"}) == 0


# ----- removals, from the server's KV event log (rank 0) ------------------------------------


def test_rank_zero_announces_the_removal_of_a_chunk_it_stored() -> None:
    log, path = FakeLog(), FakePath()
    w = worker(path, log=log)
    w.save(Metadata(stores=[spec(0, 4)]))  # chunks k0 (blocks 0-1) and k1 (blocks 2-3)
    assert path.asked_keys == [True]
    assert w.take_events() == [event(0, 4)]
    log.remove(b"k1")
    log.remove(b"someone else's")
    time.sleep(0.02)
    assert w.take_events() == [RemovedBlocks(tuple(HASHES[2:4]))]
    time.sleep(0.02)
    assert w.take_events() == [] and log.polls[-1] == 2  # each record once


def test_a_lost_log_withdraws_everything_announced() -> None:
    log = FakeLog()
    w = worker(FakePath(held=256), log=log)  # L1 full: only chunk k0 held
    w.save(Metadata(stores=[spec(0, 4)]))
    assert w.take_events() == [event(0, 2)]
    log.log = "restarted"
    time.sleep(0.02)
    assert w.take_events() == [RemovedBlocks(tuple(HASHES[0:2]))]
    log.remove(b"k0")  # already withdrawn: nothing more
    time.sleep(0.02)
    assert w.take_events() == []


def test_other_ranks_and_servers_without_a_log_do_not_poll() -> None:
    log, path = FakeLog(), FakePath()
    w = worker(path, rank=1, log=log)
    w.save(Metadata(stores=[spec(0, 2)]))
    w.take_events()
    assert w.removals is None and path.asked_keys == [False] and log.polls == []
    off = FakeLog(enabled=False)
    watch = RemovalWatch(off.poll_kv_events, interval=0.01)
    assert watch.check(now=1.0) == [] and not watch.enabled
    assert watch.check(now=2.0) == [] and off.polls == [0]  # never asked again


def test_the_watch_polls_at_its_interval_and_is_bounded() -> None:
    log = FakeLog()
    watch = RemovalWatch(log.poll_kv_events, interval=1.0, limit=2)
    e = event(0, 6)
    assert e is not None
    watch.remember([b"a", b"b", b"c"], e, chunk_size=256)  # a is dropped (limit 2)
    for key in (b"a", b"b"):
        log.remove(key)
    assert watch.check(now=10.0) == [RemovedBlocks(tuple(HASHES[2:4]))]
    log.remove(b"c")
    assert watch.check(now=10.5) == []  # not due yet
    assert watch.check(now=11.0) == [RemovedBlocks(tuple(HASHES[4:6]))]


def test_removals_are_ready_at_once_in_vllm_form() -> None:
    tally = EventTally(ranks=4)
    removed = RemovedBlocks((HASHES[0],))
    tally.add([removed])
    assert tally.take() == [removed]
    pytest.importorskip("vllm")
    from lmcache.integration.vllm.kv_events import to_vllm

    (out,) = to_vllm([removed])
    assert type(out).__name__ == "BlockRemoved" and out.medium == "CPU"
    assert len(out.block_hashes) == 1
