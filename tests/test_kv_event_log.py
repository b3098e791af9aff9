"""The server's KV event log (``--kv-event-log-size``): the ring as logic, then a real
server whose evictions and clears show up in `poll_kv_events`."""

from __future__ import annotations

import time

import pytest

from lmcache.engine.shm_kv import ShmKVCache
from lmcache.protocol.messages import PollKVEvents
from lmcache.server.kv_event_log import KVEventLog
from lmcache.types import ObjectKey

from .conftest import CHUNK, fill_random, register, start_server, unique_tokens


def key(i: int) -> ObjectKey:
    return ObjectKey(bytes([i]) * 48)


def poll(
    log: KVEventLog, after: int = 0, limit: int = 4096
) -> tuple[list[tuple[str, int]], int, bool]:
    reply = log.poll(PollKVEvents(id=1, after=after, limit=limit))
    assert reply.enabled and reply.log == "L"
    return [(r.kind, r.key[0]) for r in reply.records], reply.next, reply.lost


def test_stores_then_removals_found_by_the_sweep_in_order() -> None:
    held: set[ObjectKey] = set()
    log = KVEventLog(8, held.__contains__, "L")
    for i in (1, 2, 3):
        held.add(key(i))
        log.stored(key(i))
    held.discard(key(2))
    assert log.sweep() == 1 and log.sweep() == 0  # logged once
    records, nxt, lost = poll(log)
    assert records == [("stored", 1), ("stored", 2), ("stored", 3), ("removed", 2)]
    assert (nxt, lost) == (4, False)
    assert poll(log, after=nxt) == ([], 4, False)  # nothing new
    assert poll(log, after=2, limit=1) == ([("stored", 3)], 3, False)


def test_a_key_stored_again_before_the_sweep_is_not_removed() -> None:
    held = {key(1)}
    log = KVEventLog(8, held.__contains__, "L")
    log.stored(key(1))
    log.stored(key(1))  # evicted and stored again between two sweeps: still there
    assert log.sweep() == 0
    assert poll(log)[0] == [("stored", 1), ("stored", 1)]


def test_the_ring_is_bounded_and_says_what_was_lost() -> None:
    held: set[ObjectKey] = set()
    log = KVEventLog(3, held.__contains__, "L")
    for i in range(1, 6):
        held.add(key(i))
        log.stored(key(i))
    records, nxt, lost = poll(log, after=1)  # records 2 and 3 are gone
    assert records == [("stored", 3), ("stored", 4), ("stored", 5)] and lost and nxt == 5
    assert poll(log)[2] is False  # from the oldest kept: nothing lost to say
    records, nxt, lost = poll(log, after=99)  # another log's cursor (a restarted server)
    assert lost and records[0] == ("stored", 3)
    assert log.stats()["tracked_keys"] == 3  # the oldest keys are no longer tracked


def test_the_sweep_checks_a_bounded_batch_round_robin() -> None:
    held: set[ObjectKey] = set()
    log = KVEventLog(16, held.__contains__, "L")
    for i in range(10):
        log.stored(key(i))  # none held: all removed, 4 per sweep
    assert [log.sweep(budget=4) for _ in range(4)] == [4, 4, 2, 0]


def test_zero_size_is_refused() -> None:
    with pytest.raises(ValueError):
        KVEventLog(0, lambda _k: True, "L")


# ----- a real server -----------------------------------------------------------------------


def test_a_server_logs_stores_evictions_and_clears() -> None:
    server = start_server("--l1-size-gb", "0.001", "--kv-event-log-size", "64")
    kv = ShmKVCache(num_layers=4, num_blocks=64, block_size=16, block_bytes=2048, planes=2)
    client = server.client()
    try:
        register(client, kv, 7)
        fill_random(kv, 1)
        first = unique_tokens(2 * CHUNK)
        reply = client.store(
            "a", 7, first, start=0, end=2 * CHUNK, block_ids=range(32), want_keys=True
        )
        assert reply.stored_tokens == 2 * CHUNK and len(reply.keys) == 2
        events = client.poll_kv_events()
        assert events.enabled and not events.lost
        assert [(r.kind, r.key) for r in events.records] == [("stored", k) for k in reply.keys]

        for n in range(8):  # ~1 MiB of 128 KiB chunks: the first ones are evicted
            tokens = unique_tokens(2 * CHUNK)
            client.store(f"b{n}", 7, tokens, start=0, end=2 * CHUNK, block_ids=range(32))
        removed: set[bytes] = set()
        cursor, deadline = events.next, time.monotonic() + 10
        while not set(reply.keys) <= removed:
            assert time.monotonic() < deadline, "the evictions never showed up in the log"
            time.sleep(0.2)
            events = client.poll_kv_events(after=cursor)
            cursor = events.next
            removed |= {r.key for r in events.records if r.kind == "removed"}

        client.clear()
        deadline = time.monotonic() + 10
        while server.status()["kv_events"]["tracked_keys"]:
            assert time.monotonic() < deadline, "a clear left keys tracked"
            time.sleep(0.2)
        assert not client.store("c", 7, first, start=0, end=CHUNK, block_ids=range(16)).keys
    finally:
        client.unregister(7)
        kv.close()
        server.stop()


def test_without_a_log_the_server_says_so() -> None:
    server = start_server()
    try:
        events = server.client().poll_kv_events()
        assert not events.enabled and events.records == []
        assert server.status()["kv_events"] is None
    finally:
        server.stop()
