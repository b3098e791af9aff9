"""Lookup round trips: latency (hit and miss) and throughput at concurrency 1 and N.

The ceiling is a raw pyzmq DEALER -> ROUTER round trip to an echo process that answers
with a frame the size of a real lookup reply; the request frame is a real encoded
lookup. Every client thread has its own `LMCacheClient` (own socket), like engines do.
"""

from __future__ import annotations

import time

from lmcache.client import LMCacheClient
from lmcache.processes import ServerProcess
from lmcache.protocol.codec import encode
from lmcache.protocol.messages import Lookup, LookupReply

from .ceilings import EchoProcess, RawZmq
from .harness import Worker, percentile_us, run_threads
from .report import Row, Target
from .shapes import ModelShape
from .transfers import Scenario, SyntheticEngine, model_fields

LATENCY_TARGET = Target("ratio", "<=", 3.0)  # lookup p50 / raw zmq p50
RATE_TARGET = Target("value", ">=", 8000.0)  # lookups/s at concurrency 16


def _lookup_workers(port: int, tokens: bytes, hit: int, shape: ModelShape, n: int) -> list[Worker]:
    fields = model_fields(shape)
    out: list[Worker] = []
    for i in range(n):
        client = LMCacheClient.connect("127.0.0.1", port, timeout=30)
        rid = f"bench-conc-{i}"

        def step(client: LMCacheClient = client, rid: str = rid) -> None:
            got = client.lookup(rid, tokens, **fields)
            if got != hit:
                raise RuntimeError(f"concurrent lookup hit {got} tokens, expected {hit}")

        def close(client: LMCacheClient = client, rid: str = rid) -> None:
            client.end_session(rid)  # each lookup replaced its session; drop the last
            client.close()

        out.append((step, close))
    return out


def _raw_workers(port: int, frame: bytes, n: int) -> list[Worker]:
    out: list[Worker] = []
    for _ in range(n):
        raw = RawZmq(port, frame)
        out.append((raw.call, raw.close))
    return out


def measure_lookups(
    *,
    server: ServerProcess, shape: ModelShape, tokens: int, rounds: int, seconds: float,
    concurrency: tuple[int, ...],
) -> tuple[list[Row], dict[str, object]]:  # fmt: skip
    sc = Scenario(block_tokens=16, chunk_tokens=256, mode="engine_driven", engines=1)
    engine = SyntheticEngine(shape, sc, tokens, server.port, instance_id=200)
    echo: EchoProcess | None = None
    try:
        hit = engine.fresh_tokens()
        engine.store(hit)
        miss = engine.fresh_tokens()
        fields = model_fields(shape)
        frame = encode(Lookup(id=10**9, request_id="bench-lat", tokens=hit, **fields))
        echo = EchoProcess(len(encode(LookupReply(id=10**9, hit_tokens=tokens))))
        raw = RawZmq(echo.port, frame)
        lat: dict[str, list[float]] = {"raw": [], "hit": [], "miss": []}
        c, pc = engine.client, time.perf_counter
        for i in range(rounds + rounds // 10):  # the first tenth warms up
            t0 = pc()
            raw.call()
            t1 = pc()
            got_hit = c.lookup("bench-lat-hit", hit, **fields)
            t2 = pc()
            got_miss = c.lookup("bench-lat-miss", miss, **fields)
            t3 = pc()
            if got_hit != tokens or got_miss != 0:
                raise RuntimeError(f"lookup hit {got_hit} (want {tokens}), miss {got_miss}")
            if i >= rounds // 10:
                lat["raw"].append(t1 - t0)
                lat["hit"].append(t2 - t1)
                lat["miss"].append(t3 - t2)
        c.end_session("bench-lat-hit")
        c.end_session("bench-lat-miss")
        raw.close()
        rates: dict[str, float] = {}
        for n in concurrency:
            rates[f"raw_{n}"] = run_threads(_raw_workers(echo.port, frame, n), seconds)
            rates[f"lookup_{n}"] = run_threads(
                _lookup_workers(server.port, hit, tokens, shape, n), seconds
            )
    finally:
        if echo is not None:
            echo.stop()
        engine.close()
    p = {k: (percentile_us(v, 50), percentile_us(v, 99)) for k, v in lat.items()}
    sec = f"lookup ({tokens}-token prompt = {tokens // 256} chunks)"
    rows = [
        Row(sec, "lookup hit p50", p["hit"][0], "us", "raw pyzmq round trip p50", p["raw"][0],
            LATENCY_TARGET),
        Row(sec, "lookup hit p99", p["hit"][1], "us", "raw pyzmq round trip p99", p["raw"][1]),
        Row(sec, "lookup miss p50", p["miss"][0], "us", "raw pyzmq round trip p50", p["raw"][0],
            LATENCY_TARGET),
        Row(sec, "lookup miss p99", p["miss"][1], "us", "raw pyzmq round trip p99", p["raw"][1]),
    ]  # fmt: skip
    for n in concurrency:
        rows.append(
            Row(sec, f"lookups/s, concurrency {n}", rates[f"lookup_{n}"], "/s",
                f"raw pyzmq round trips/s, conc. {n}", rates[f"raw_{n}"],
                RATE_TARGET if n >= 16 else None)
        )  # fmt: skip
    return rows, {"latency_s": lat, "rates": rates, "frame_bytes": len(frame)}
