"""L2 tiers through a real server: write-behind store and prefetch-on-lookup GB/s.

    store     an engine stores fresh chunks into L1; the server's writer threads copy
              them to L2. Timed from the store call until /status shows every chunk
              in L2 (so it includes the L1 store and the queue).
    prefetch  L1 is cleared (POST /clear-cache); a lookup answers "pending" while the
              server loads the chunks from L2 into L1; timed until the lookup reports
              the full hit. The loaded KV is checked byte for byte once.
    full      Redis only, when the bench started it: ``maxmemory`` set to what the run
              left in it (allkeys-lru), then stores again, so every new part evicts an
              old one, as in a cache in service; redis-server reuses freed memory
              instead of faulting in fresh pages (see README, "What limits the misses").

Ceilings: the same number of objects of the same size written / read with plain
files in the same directory, and with redis-py SET / GET against the same server.

Waiting for a store to reach L2: /status costs the server about 1 ms of CPU (and the GIL)
per call; polled every 5 ms it took 15-30% of a core from the writer it measured. For
Redis the wait polls redis-server's count of EXEC calls (one MULTI/EXEC per chunk, a few
microseconds per INFO) and asks /status once the count is there.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from redis import Redis as RedisClient

from lmcache.processes import RedisProcess, ServerProcess

from .ceilings import RawFiles, RawRedis
from .harness import GB, median
from .report import Row, Target
from .shapes import ModelShape
from .transfers import Scenario, SyntheticEngine, model_fields

REDIS_TARGET = Target("value", ">=", 1.0)  # GB/s on loopback
SECTION = "L2 tiers through the server (GB/s)"


def _wait_stored(
    server: ServerProcess, want: int, probe: tuple[Callable[[], int], int] | None = None,
    timeout: float = 300,
) -> None:  # fmt: skip
    """Until /status shows ``want`` objects stored and nothing queued. With ``probe``
    (count, target), /status is asked every 5 ms only once ``count()`` reached ``target``
    (before that every 0.25 s, to notice an overflowing queue)."""
    deadline = time.monotonic() + timeout
    next_status = 0.0
    while True:
        now = time.monotonic()
        if probe is None or now >= next_status or probe[0]() >= probe[1]:
            tier = server.status()["l2_adapters"][0]
            if tier["stored_objects"] >= want and tier["queue_depth"] == 0:
                return
            if tier.get("queue_skipped_full"):
                raise RuntimeError("the L2 write-behind queue overflowed; lower --tokens")
            if now > deadline:
                raise RuntimeError(f"L2 stored {tier['stored_objects']} of {want} objects in time")
            next_status = now + 0.25
        time.sleep(0.005 if probe is None else 0.002)


def _wait_hit(engine: SyntheticEngine, tokens: bytes, rid: str, timeout: float = 300) -> None:
    fields = model_fields(engine.shape)
    hit = engine.client.lookup(rid, tokens, **fields)
    deadline = time.monotonic() + timeout
    while hit is None:
        if time.monotonic() > deadline:
            raise RuntimeError("prefetch from L2 did not finish in time")
        time.sleep(0.001)
        hit = engine.client.query_lookup(rid)
    engine.client.end_session(rid)
    if hit != engine.tokens:
        raise RuntimeError(f"after prefetch the lookup hit {hit} of {engine.tokens} tokens")


def measure_tier(
    *,
    name: str, adapter: dict[str, Any], raw: RawFiles | RawRedis, shape: ModelShape,
    tokens: int, reps: int, l1_size_gb: float, puts: Callable[[], int] | None = None,
    prefetch: bool = True,
) -> tuple[list[Row], dict[str, Any]]:  # fmt: skip
    """``puts``: a cheap count that grows by one per chunk stored (see the module doc);
    ``prefetch=False``: the store row only."""
    sc = Scenario(block_tokens=16, chunk_tokens=256, mode="engine_driven", engines=1)
    server = ServerProcess.start(
        "--l2-adapter", json.dumps(adapter), "--l1-size-gb", str(l1_size_gb)
    )
    engine: SyntheticEngine | None = None
    t: dict[str, list[float]] = {"store": [], "prefetch": [], "raw_write": [], "raw_read": []}
    try:
        engine = SyntheticEngine(shape, sc, tokens, server.port, instance_id=400)
        chunks = tokens // sc.chunk_tokens
        stored = 0
        for rep in range(reps + 1):  # rep 0 warms up
            prompt = engine.fresh_tokens()
            probe = None if puts is None else (puts, puts() + chunks)
            t0 = time.perf_counter()
            engine.store(prompt)
            stored += chunks
            _wait_stored(server, stored, probe)
            t_store = time.perf_counter() - t0
            server.http_json("POST", "/clear-cache")
            t_prefetch = 0.0
            if prefetch:
                t0 = time.perf_counter()
                _wait_hit(engine, prompt, f"bench-l2-{rep}")
                t_prefetch = time.perf_counter() - t0
                if rep == 0:
                    _check_bytes(engine, prompt)
            if rep:
                t["store"].append(t_store)
                t["raw_write"].append(raw.write())
                if prefetch:
                    t["prefetch"].append(t_prefetch)
                    t["raw_read"].append(raw.read())
        tier_status = server.status()["l2_adapters"][0]
        nbytes = engine.kv_bytes
    finally:
        if engine is not None:
            engine.close()
        raw.close()
        server.stop()
    g = {k: nbytes / median(v) / GB for k, v in t.items() if v}
    raw_name = "redis-py SET" if isinstance(raw, RawRedis) else "open+write files"
    raw_read = "redis-py GET" if isinstance(raw, RawRedis) else "open+readinto files"
    target = REDIS_TARGET if name == "redis" else None
    rows = [
        Row(SECTION, f"{name}: store (L1 + write-behind)", g["store"], "GB/s", raw_name,
            g["raw_write"], target),
    ]  # fmt: skip
    if prefetch:
        rows.append(Row(SECTION, f"{name}: prefetch into L1 on lookup", g["prefetch"], "GB/s",
                        raw_read, g["raw_read"], target))  # fmt: skip
    return rows, {"seconds": t, "server_status": tier_status}


def _check_bytes(engine: SyntheticEngine, prompt: bytes) -> None:
    """The prefetched KV, retrieved into poisoned blocks, equals what was stored."""
    blocks = engine.kv.blocks
    expected = blocks[:, :, engine.src_ids].copy()
    blocks[:, :, engine.dst_ids] = 0xAB
    engine.retrieve(prompt)
    if not np.array_equal(blocks[:, :, engine.dst_ids], expected):
        raise RuntimeError("KV prefetched from L2 differs from the stored KV")


def measure_l2(
    *,
    shape: ModelShape, tokens: int, reps: int, l2_dir: Path | None, redis_url: str | None,
    with_redis: bool, l1_size_gb: float, with_fs: bool = True,
) -> tuple[list[Row], dict[str, Any]]:  # fmt: skip
    rows: list[Row] = []
    raw_out: dict[str, Any] = {}
    chunk_bytes = shape.token_bytes() * 256
    objects = tokens // 256
    if with_fs:
        base = Path(tempfile.mkdtemp(prefix="lmcache-bench-l2-", dir=l2_dir))
        try:
            adapter = {"type": "fs", "path": str(base / "fs")}
            r, raw_out["fs"] = measure_tier(
                name=f"fs ({base.parent})", adapter=adapter,
                raw=RawFiles(base, objects, chunk_bytes), shape=shape, tokens=tokens, reps=reps,
                l1_size_gb=l1_size_gb,
            )  # fmt: skip
            rows += r
        finally:
            shutil.rmtree(base, ignore_errors=True)
    if not with_redis:
        return rows, raw_out
    redis = None if redis_url else RedisProcess.start()
    url = redis_url or (redis.url if redis else "")
    client = RedisClient.from_url(url)
    try:
        adapter = {"type": "redis", "url": url}
        r, raw_out["redis"] = measure_tier(
            name="redis", adapter=adapter, raw=RawRedis(url, objects, chunk_bytes),
            shape=shape, tokens=tokens, reps=reps, puts=lambda: _exec_calls(client),
            l1_size_gb=l1_size_gb,
        )  # fmt: skip
        rows += r
        if redis is not None:  # ours to reconfigure: full from now on
            # at least two stores' worth, so that one store never has to evict itself
            floor = 2 * tokens * shape.token_bytes()
            client.config_set("maxmemory", max(client.info("memory")["used_memory"], floor))
            client.config_set("maxmemory-policy", "allkeys-lru")
            r, raw_out["redis_full"] = measure_tier(
                name="redis, full (maxmemory, LRU evicting)", adapter=adapter,
                raw=RawRedis(url, objects, chunk_bytes), shape=shape, tokens=tokens, reps=reps,
                puts=lambda: _exec_calls(client), prefetch=False, l1_size_gb=l1_size_gb,
            )  # fmt: skip
            rows += r
    finally:
        client.close()
        if redis is not None:
            redis.stop()
    return rows, raw_out


def _exec_calls(client: Any) -> int:
    """EXEC calls redis-server has run (one per chunk the Redis adapter stores)."""
    return int(client.info("commandstats").get("cmdstat_exec", {}).get("calls", 0))
