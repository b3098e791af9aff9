"""L2 tiers behind a real server: filesystem and Redis, restarts, sharing, failures."""

from __future__ import annotations

import json
import time
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest
import redis as redis_lib

from lmcache.engine.shm_kv import ShmKVCache
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
from lmcache.storage.chunk_store import ChunkLayout
from lmcache.storage.l1_objects import Lease
from lmcache.storage.l2.memory import MemoryL2
from lmcache.transport.zmq_server import Deferred
from lmcache.types import ObjectKey

from .conftest import (
    CHUNK,
    MODEL,
    ServerProcess,
    fill_random,
    lookup_hit,
    register,
    start_redis,
    start_server,
    unique_tokens,
)


def fs_adapter(path: Path) -> str:
    return f'{{"type": "fs", "path": "{path}"}}'


def store_three_chunks(
    server: ServerProcess, engine: ShmKVCache, iid: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    client = server.client()
    register(client, engine, iid)
    fill_random(engine, seed)
    tokens = unique_tokens(3 * CHUNK)
    assert (
        client.store("s", iid, tokens, start=0, end=3 * CHUNK, block_ids=range(48)).stored_tokens
        == 3 * CHUNK
    )
    return tokens, engine.blocks[:, :, :48].copy()


def wait_l2_objects(server: ServerProcess, n: int) -> None:
    deadline = time.monotonic() + 10
    while sum(a["stored_objects"] for a in server.http().get("/status").json()["l2_adapters"]) < n:
        assert time.monotonic() < deadline, server.http().get("/status").json()["l2_adapters"]
        time.sleep(0.05)


def retrieve_is_exact(
    server: ServerProcess, engine: ShmKVCache, iid: int, tokens: np.ndarray, original: np.ndarray
) -> None:
    client = server.client()
    assert lookup_hit(client, "r", tokens, **MODEL) == 3 * CHUNK
    engine.blocks[...] = 0
    client.retrieve("r", iid, tokens, start=0, end=3 * CHUNK, block_ids=range(16, 64))
    np.testing.assert_array_equal(engine.blocks[:, :, 16:64], original)
    client.end_session("r")


def test_fs_tier_survives_a_restart(tmp_path: Path, engine: ShmKVCache) -> None:
    first = start_server("--l2-adapter", fs_adapter(tmp_path / "kv"))
    try:
        tokens, original = store_three_chunks(first, engine, 1, seed=1)
        wait_l2_objects(first, 3)
    finally:
        first.stop()
    second = start_server("--l2-adapter", fs_adapter(tmp_path / "kv"))  # empty L1
    try:
        client = second.client()
        register(client, engine, 1)
        assert client.lookup("p", tokens, **MODEL) is None  # pending: loading from L2
        client.end_session("p")
        retrieve_is_exact(second, engine, 1, tokens, original)
        status = second.http().get("/status").json()
        (fs,) = status["l2_adapters"]
        assert fs["objects"] == 3 and fs["hits"] >= 3 and fs["prefetched_objects"] == 3
        metrics = second.http().get("/metrics").text
        assert 'lmcache_l2_objects{adapter="fs:' in metrics
        # Evicting or clearing L1 does not touch L2; clearing L2 does.
        second.http().post("/clear-cache")
        assert second.http().get("/status").json()["l2_adapters"][0]["objects"] == 3
        assert second.http().post("/clear-l2").json() == {"status": "ok", "removed": 3}
        assert lookup_hit(client, "gone", tokens, **MODEL) == 0
    finally:
        second.stop()


def test_two_servers_share_one_redis(engine: ShmKVCache) -> None:
    redis = start_redis()
    adapter = f'{{"type": "redis", "url": "{redis.url}"}}'
    a, b = start_server("--l2-adapter", adapter), start_server("--l2-adapter", adapter)
    try:
        tokens, original = store_three_chunks(a, engine, 7, seed=2)
        wait_l2_objects(a, 3)
        register(b.client(), engine, 7)
        retrieve_is_exact(b, engine, 7, tokens, original)
    finally:
        a.stop()
        b.stop()
        redis.stop()


def test_dead_redis_means_misses_and_a_degraded_but_healthy_server(engine: ShmKVCache) -> None:
    redis = start_redis()
    server = start_server("--l2-adapter", f'{{"type": "redis", "url": "{redis.url}"}}')
    try:
        client = server.client()
        register(client, engine, 9)
        redis.stop()
        for i in range(3):  # stores still land in L1; lookups of unknown prompts miss
            tokens = unique_tokens(2 * CHUNK)
            assert client.store(
                f"s{i}", 9, tokens, start=0, end=2 * CHUNK, block_ids=range(32)
            ).stored_tokens
            assert lookup_hit(client, f"l{i}", tokens, **MODEL) == 2 * CHUNK
            assert lookup_hit(client, f"m{i}", unique_tokens(2 * CHUNK), **MODEL) == 0
        deadline = time.monotonic() + 10
        while "degraded" not in (health := server.http().get("/healthcheck")).json():
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert health.status_code == 200 and "redis" in health.json()["degraded"][0]
    finally:
        server.stop()
        redis.stop()


def test_invalid_adapter_config_names_the_field() -> None:
    bad = start_server("--l2-adapter", '{"type": "fs"}', wait=False)
    assert bad.proc.wait(timeout=30) == 1
    assert "path" in bad.log()
    worse = start_server("--l2-adapter", "not json", wait=False)
    assert worse.proc.wait(timeout=30) != 0
    assert "--l2-adapter" in worse.log()


def test_store_policy_first_is_a_fallback_chain(engine: ShmKVCache, tmp_path: Path) -> None:
    """--l2-store-policy first: chunks go to the first tier that is up, the next tier only
    while an earlier one fails (from the very chunk whose write failed)."""
    near, far = tmp_path / "near", tmp_path / "far"
    server = start_server(
        "--l2-adapter", fs_adapter(near), "--l2-adapter", fs_adapter(far),
        "--l2-store-policy", "first",
    )  # fmt: skip
    try:
        store_three_chunks(server, engine, 11, seed=5)
        wait_l2_objects(server, 3)

        def objects() -> list[int]:
            return [a["objects"] for a in server.http().get("/status").json()["l2_adapters"]]

        assert objects() == [3, 0]
        near.rename(tmp_path / "near.gone")  # the near tier breaks: writes there fail
        near.write_bytes(b"not a directory")
        store_three_chunks(server, engine, 12, seed=6)
        wait_l2_objects(server, 6)
        assert objects() == [3, 3]
        assert server.http().get("/status").json()["l2_adapters"][0]["store_policy"] == "first"
    finally:
        server.stop()


def test_store_policy_all_writes_every_tier(engine: ShmKVCache, tmp_path: Path) -> None:
    server = start_server(
        "--l2-adapter", fs_adapter(tmp_path / "a"), "--l2-adapter", fs_adapter(tmp_path / "b"),
        "--l2-prefetch-policy", "fastest",
    )  # fmt: skip
    try:
        store_three_chunks(server, engine, 13, seed=7)
        wait_l2_objects(server, 6)
        status = server.http().get("/status").json()["l2_adapters"]
        assert [a["objects"] for a in status] == [3, 3] and status[0]["store_policy"] == "all"
        assert [(a["prefetch_policy"], a["read_gbps"]) for a in status] == [("fastest", None)] * 2
    finally:
        server.stop()


def test_a_prefetch_that_finishes_at_once_counts_each_chunk_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The L1 hit is fixed before L2 loads more into the same lease: a prefetch that ran
    faster than the lookup once had its chunks counted twice (a hit past the prompt)."""
    c = 4  # tokens per chunk
    core = build(
        ServerSettings(chunk_size=c), np.zeros(1 << 20, dtype=np.uint8),
        registry=EngineRegistry(c), metrics=Metrics(dict), adapters=[MemoryL2()],
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
        tokens = unique_tokens(4 * c).astype("<u4").tobytes()

        def store(rid: int, chunks: int) -> None:
            req = StoreBytes(id=rid, request_id="s", instance_id=1, tokens=tokens, start=0,
                             end=chunks * c)  # fmt: skip
            work = h.dispatch(req, [memoryview(bytes([rid]) * 64)] * chunks)
            assert isinstance(work, Deferred) and isinstance(work.run(), StoreReply)

        store(2, 4)  # all four chunks, copied to L2 behind
        deadline = time.monotonic() + 10
        while core.tiers.status()[0]["stored_objects"] < 4:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        core.store.clear()
        store(3, 1)  # L1 holds chunk 0 only; chunks 1-3 are in L2

        tiers = core.tiers

        def at_once(
            lease: Lease, groups: list[list[ObjectKey]], layouts: list[ChunkLayout], salt: str = ""
        ) -> Future[list[list[ObjectKey]]]:
            done: Future[list[list[ObjectKey]]] = Future()
            done.set_result(tiers._find_and_load(lease, groups, layouts, salt))
            return done

        monkeypatch.setattr(tiers, "prefetch", at_once)
        lookup = Lookup(id=4, request_id="r", tokens=tokens, **MODEL)
        assert h.dispatch(lookup) == LookupReply(id=4, hit_tokens=None)
        assert h.dispatch(QueryLookup(id=5, request_id="r")) == LookupReply(id=5, hit_tokens=4 * c)
    finally:
        core.tiers.stop()


@pytest.mark.parametrize("shape", ["resp", "valkey"])
def test_upstream_redis_adapter_shapes_reach_a_real_redis(engine: ShmKVCache, shape: str) -> None:
    """Upstream's JSON for its Redis adapters, as its docs write them, against a real
    redis-server: server A writes through it, server B (same JSON) reads byte for byte."""
    redis = start_redis()
    config = (
        {"type": "resp", "host": "127.0.0.1", "port": redis.port}
        if shape == "resp"
        else {"type": "valkey", "startup_nodes": f"127.0.0.1:{redis.port}"}
    )
    adapter = json.dumps(config)
    a, b = start_server("--l2-adapter", adapter), start_server("--l2-adapter", adapter)
    try:
        assert a.http().get("/status").json()["l2_adapters"][0]["name"].startswith("redis://")
        tokens, original = store_three_chunks(a, engine, 7, seed=4)
        wait_l2_objects(a, 3)
        assert redis_lib.Redis(port=redis.port).dbsize() > 0  # the bytes are in that Redis
        register(b.client(), engine, 7)
        retrieve_is_exact(b, engine, 7, tokens, original)
    finally:
        a.stop()
        b.stop()
        redis.stop()


def test_upstream_fs_adapter_shape_base_path(engine: ShmKVCache, tmp_path: Path) -> None:
    """Upstream's fs JSON (``base_path``) on a real directory, read back after a restart."""
    adapter = json.dumps({"type": "fs", "base_path": str(tmp_path / "kv")})
    server = start_server("--l2-adapter", adapter)
    try:
        tokens, original = store_three_chunks(server, engine, 7, seed=5)
        wait_l2_objects(server, 3)
    finally:
        server.stop()
    assert any((tmp_path / "kv").rglob("*"))
    server = start_server("--l2-adapter", adapter)
    try:
        register(server.client(), engine, 7)
        retrieve_is_exact(server, engine, 7, tokens, original)
    finally:
        server.stop()
