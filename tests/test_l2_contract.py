"""One contract, every L2 adapter: memory, fs (tmp dir), Redis and Redis Cluster (real servers),
through the ``backend`` fixture of `tests.l2_backends` (which says how each one is reached
and broken). What each adapter does beyond the contract (fs restarts, configs, Redis
credentials, failures and URLs) is in test_l2_adapters.py.

A dead Redis raises `L2Error` from every method (get_into and exists included: the
server then knows to skip the adapter for a while instead of counting misses).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from lmcache.storage.l2.base import L2Error
from lmcache.storage.l2.format import HEADER_SIZE
from lmcache.storage.l2.fs import FsL2
from lmcache.storage.l2.memory import MemoryL2
from lmcache.storage.l2.redis import RedisL2

from .l2_backends import (
    Backend,
    MiB,
    backend,
    blob,
    capacity_gb,
    key,
    redis_cluster,
    redis_server,
)

__all__ = ["backend", "redis_cluster", "redis_server"]


@pytest.mark.parametrize("size", [0, 1, 4 * MiB + 1, 40 * MiB])
def test_put_exists_get_byte_exact(backend: Backend, size: int) -> None:
    a = backend.new()
    k, data = key(1), blob(size, seed=size)
    assert a.exists([k]) == [False]
    a.put(k, memoryview(data))
    assert a.exists([k]) == [True]
    out = bytearray(b"\xee" * size)
    assert a.get_into(k, memoryview(out)) is True
    assert out == data


def test_exists_is_one_batched_query(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    a = backend.new()
    keys = [key(i) for i in range(40)]
    for k in keys[::3]:
        a.put(k, b"x" * 100)
    expected = [i % 3 == 0 for i in range(40)]
    if isinstance(a, RedisL2):
        client = a._connect()
        calls: list[str] = []
        real_pipeline = client.pipeline

        def pipeline(**kw: Any) -> Any:
            calls.append("pipeline")
            return real_pipeline(**kw)

        monkeypatch.setattr(client, "pipeline", pipeline)
        monkeypatch.setattr(client, "execute_command", lambda *a, **k: calls.append("command"))
        assert a.exists(keys) == expected
        assert calls == ["pipeline"]  # one pipeline = one round trip; no single commands
    else:
        assert a.exists(keys) == expected
    assert a.exists([]) == []


def test_miss_leaves_out_alone(backend: Backend) -> None:
    a = backend.new()
    out = bytearray(b"\xab" * 1000)
    assert a.get_into(key(7), memoryview(out)) is False
    assert out == b"\xab" * 1000
    assert a.stats()["misses"] == 1


def test_overwrite_with_other_sizes(backend: Backend) -> None:
    a = backend.new(part_mb=1) if backend.redis is not None else backend.new()
    k = key(2)
    for size in (3 * MiB + 5, MiB // 2, 0, 2 * MiB):
        a.put(k, blob(size, seed=size))
        out = bytearray(size)
        assert a.get_into(k, memoryview(out)) and out == blob(size, seed=size)
    if backend.redis is not None:  # the 3-part object's third part is gone
        assert backend.redis.exists(backend.part_name(k, 2)) == 0


def test_delete(backend: Backend) -> None:
    a = backend.new()
    k1, k2 = key(1), key(2)
    a.put(k1, blob(5 * MiB))
    a.put(k2, b"two")
    a.delete(k1)
    a.delete(key(3))  # absent: no error
    assert a.exists([k1, k2]) == [False, True]
    assert a.get_into(k1, memoryview(bytearray(5 * MiB))) is False
    if backend.redis is not None:
        assert backend.redis.keys(f"{backend.prefix}{{{k1.hex()}}}*") == []


def test_clear_removes_only_its_own_objects(backend: Backend) -> None:
    a = backend.new()
    sibling = backend.plant_foreign(a)
    for i in range(5):
        a.put(key(i), blob(1000 + i))
    if sibling is not None:
        sibling.put(key(99), b"sibling")
    assert a.clear() == 5
    assert a.exists([key(i) for i in range(5)]) == [False] * 5
    assert a.stats()["objects"] in (0, None)
    assert backend.foreign_intact(a)
    if sibling is not None:
        out = bytearray(7)
        assert sibling.get_into(key(99), memoryview(out)) and out == b"sibling"
    assert a.clear() == 0


def test_capacity_evicts_least_recently_used(backend: Backend) -> None:
    if backend.redis is not None:
        pytest.skip("Redis adapters are unbounded (Redis' own maxmemory policy applies)")
    size = 300_000
    a = backend.new(max_capacity_gb=capacity_gb(4 * (size + HEADER_SIZE)))
    for i in range(4):
        a.put(key(i), blob(size, seed=i))
    assert a.get_into(key(0), memoryview(bytearray(size)))  # 0 is now the most recent
    a.put(key(4), blob(size, seed=4))
    assert a.exists([key(i) for i in range(5)]) == [True, False, True, True, True]
    s = a.stats()
    assert s["evictions"] == 1 and s["objects"] == 4
    assert s["bytes"] <= s["capacity_bytes"] == 4 * (size + HEADER_SIZE)
    a.put(key(5), blob(5 * size))  # larger than the whole capacity: not stored
    assert a.exists([key(5)]) == [False] and a.stats()["rejected"] == 1
    if isinstance(a, FsL2):
        files = list(Path(a.root).rglob("*.kv"))
        assert len(files) == 4 and sum(f.stat().st_size for f in files) == s["bytes"]


@pytest.mark.parametrize(
    ("policy", "survivors"),
    [
        ("LRU", [True, False, True, True, True]),  # 1: least recently used (0 was read)
        ("LFU", [True, False, False, True, True]),  # 1 and 2: never read (0 and 3 were)
        ("FIFO", [False, True, True, True, True]),  # 0: oldest, reads do not matter
    ],
)
def test_capacity_follows_the_eviction_policy(
    backend: Backend, policy: str, survivors: list[bool]
) -> None:
    """Bounded adapters drop objects in the order of the L1's own policies."""
    if backend.redis is not None:
        pytest.skip("Redis adapters are unbounded (Redis' own maxmemory policy applies)")
    size = 200_000
    a = backend.new(max_capacity_gb=capacity_gb(4 * (size + HEADER_SIZE)), eviction_policy=policy)
    for i in range(4):
        a.put(key(i), blob(size, seed=i))
    out = memoryview(bytearray(size))
    for k in (0, 0, 3):
        assert a.get_into(key(k), out)
    a.put(key(4), blob(size, seed=4))  # over capacity: one object goes ...
    if policy == "LFU":  # ... and for LFU the next newcomer pushes out the other unread one
        assert a.get_into(key(4), out)
        a.put(key(5), blob(size, seed=5))
    assert a.exists([key(i) for i in range(5)]) == survivors
    assert a.stats()["eviction_policy"] == policy
    assert a.stats()["bytes"] <= a.stats()["capacity_bytes"]


@pytest.mark.parametrize("offset", [0, 4 * MiB + 3])
def test_corrupted_payload_is_a_miss_and_deleted(backend: Backend, offset: int) -> None:
    a = backend.new()
    k, size = key(3), 5 * MiB
    a.put(k, blob(size))
    backend.corrupt(a, k, offset)
    assert a.get_into(k, memoryview(bytearray(size))) is False
    assert a.exists([k]) == [False]
    assert a.stats()["corrupted"] == 1 and a.stats()["misses"] == 1
    a.put(k, blob(size))  # and it can be stored again
    out = bytearray(size)
    assert a.get_into(k, memoryview(out)) and out == blob(size)


def test_torn_object_is_a_miss_and_deleted(backend: Backend) -> None:
    a = backend.new()
    k, size = key(4), 5 * MiB
    a.put(k, blob(size))
    backend.tear(a, k)
    assert a.get_into(k, memoryview(bytearray(size))) is False
    assert a.exists([k]) == [False]


def test_wrong_size_is_a_miss_and_deleted(backend: Backend) -> None:
    a = backend.new()
    a.put(key(5), blob(1000))
    assert a.get_into(key(5), memoryview(bytearray(999))) is False
    assert a.exists([key(5)]) == [False]


def test_accepts_numpy_views(backend: Backend) -> None:
    np = pytest.importorskip("numpy")
    a = backend.new()
    src = np.arange(1000, dtype=np.float32)
    a.put(key(6), memoryview(src))
    dst = np.zeros(4000, dtype=np.uint8)
    assert a.get_into(key(6), memoryview(dst))
    assert dst.view(np.float32).tolist() == src.tolist()


def test_stats_counters_move(backend: Backend) -> None:
    a = backend.new()
    s0 = a.stats()
    for field_name in ("type", "name", "objects", "bytes", "capacity_bytes", "last_error"):
        assert field_name in s0
    assert s0["type"] == backend.kind.split("-")[0] and s0["name"] == a.name
    assert s0["healthy"] is True and s0["hits"] == s0["misses"] == s0["errors"] == 0
    a.put(key(1), b"abc")
    a.get_into(key(1), memoryview(bytearray(3)))
    a.get_into(key(2), memoryview(bytearray(3)))
    s = a.stats()
    assert (s["puts"], s["hits"], s["misses"]) == (1, 1, 1)
    if s["objects"] is not None:
        assert (s["objects"], s["bytes"]) == (1, 3 + HEADER_SIZE)


def test_threads_share_one_adapter(backend: Backend) -> None:
    a = backend.new()
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(15):
                k, data = key(t * 100 + i % 4), blob(20_000 + t, seed=t)
                a.put(k, data)
                out = bytearray(len(data))
                assert a.get_into(k, memoryview(out)) and out == data
                assert a.exists([k]) == [True]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    assert a.stats()["errors"] == 0


def test_closed_adapter_refuses_work(backend: Backend) -> None:
    a = backend.new()
    a.close()
    a.close()  # idempotent
    with pytest.raises(L2Error, match="closed"):
        a.put(key(1), b"x")
    assert a.stats()["name"] == a.name


def test_memory_down_switch_simulates_an_outage() -> None:
    a = MemoryL2()
    a.put(key(1), b"x")
    a.down = True
    for call in (lambda: a.put(key(2), b"y"), lambda: a.exists([key(1)]), a.clear):
        with pytest.raises(L2Error, match="down"):
            call()
    assert a.stats()["healthy"] is False and a.stats()["errors"] == 3
    a.down = False
    assert a.exists([key(1)]) == [True] and a.stats()["healthy"] is True
