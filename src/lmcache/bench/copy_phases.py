"""Timed phases over synthetic engines: store/retrieve matrix and eviction steady state.

Server repetitions are interleaved with their ceilings rep by rep, so background load
on a shared machine hits both alike; results are medians.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import ExitStack

from lmcache.processes import ServerProcess
from lmcache.storage.shm import ShmSegment

from .ceilings import InProcessCopy, PlainCopy
from .harness import GB, median, parallel_seconds
from .report import Row, Target
from .shapes import ModelShape
from .transfers import Scenario, SyntheticEngine

# Of np.copyto of the same bytes (each engine's bytes by one np.copyto, engines at once),
# chunk 256: the physical ceiling (issue 12). The in-process gather/scatter rows beside
# them show how much of it the copy routine alone reaches.
COPY_TARGET = Target("ratio", ">=", 0.85)
EVICTION_TARGET = Target("ratio", ">=", 0.9)  # evicting steady state / non-evicting


def _gbps(nbytes: int, seconds: list[float]) -> float:
    return nbytes / median(seconds) / GB


def measure_scenario(
    server: ServerProcess, shape: ModelShape, sc: Scenario, tokens: int, reps: int
) -> tuple[list[Row], dict[str, list[float]]]:
    """Store and retrieve ``tokens`` in total, split evenly over ``sc.engines`` engines."""
    per_engine = tokens // sc.engines
    with ExitStack() as stack:
        engines: list[SyntheticEngine] = []
        ceilings: list[InProcessCopy] = []
        for i in range(sc.engines):
            e = SyntheticEngine(shape, sc, per_engine, server.port, instance_id=100 + i)
            stack.callback(e.close)
            engines.append(e)
            # Map the engine's segment a second time, as the server does.
            seg = ShmSegment.attach(e.kv.segment.name, e.kv.segment.token)
            stack.callback(seg.close)
            inproc = InProcessCopy(e.kv.layout, [seg.array], e.bpc, len(e.src_ids), f"{sc.mode}{i}")
            stack.callback(inproc.close)
            ceilings.append(inproc)
        nbytes = sum(e.kv_bytes for e in engines)
        plain = [PlainCopy(e.kv_bytes) for e in engines]
        engines[0].verify_roundtrip()
        client = engines[0].client

        def together(fn: Callable[[int], None]) -> float:
            jobs: list[Callable[[], None]] = [functools.partial(fn, i) for i in range(sc.engines)]
            return parallel_seconds(jobs)

        def store_one(i: int, batch: list[bytes]) -> None:
            engines[i].store(batch[i])

        t: dict[str, list[float]] = {k: [] for k in ("store", "gather", "copy")}
        stored: list[bytes] = []
        for rep in range(reps + 1):  # rep 0 warms every path up and is not kept
            client.clear()
            stored = [e.fresh_tokens() for e in engines]
            times = (
                together(functools.partial(store_one, batch=stored)),
                together(lambda i: ceilings[i].gather(engines[i].src_ids)),
                together(lambda i: plain[i].copy()),
            )
            if rep:
                for k, v in zip(t, times, strict=True):
                    t[k].append(v)
        t.update(retrieve=[], scatter=[], copy_r=[])
        for rep in range(reps + 1):
            times = (
                together(lambda i: engines[i].retrieve(stored[i])),
                together(lambda i: ceilings[i].scatter(engines[i].dst_ids)),
                together(lambda i: plain[i].copy()),
            )
            if rep:
                for k, v in zip(("retrieve", "scatter", "copy_r"), times, strict=True):
                    t[k].append(v)
        client.clear()
    g = {k: _gbps(nbytes, v) for k, v in t.items()}
    target = COPY_TARGET if sc.chunk_tokens == 256 else None
    section = "store / retrieve (GB/s, GB = 1e9 B)"
    name = sc.label()
    ceiling = "np.copyto same bytes"
    # Same bytes on both sides, so a smaller run's miss may be only its per-call costs
    # (report.expected_at_size); the eviction row's extra work grows with the bytes instead.
    rows = [
        Row(
            section, f"store: {name}", g["store"], "GB/s", ceiling, g["copy"], target, tokens=tokens
        ),
        Row(
            section,
            f"retrieve: {name}",
            g["retrieve"],
            "GB/s",
            ceiling,
            g["copy_r"],
            target,
            tokens=tokens,
        ),
        Row(section, f"in-process gather: {name}", g["gather"], "GB/s", ceiling, g["copy"]),
        Row(section, f"in-process scatter: {name}", g["scatter"], "GB/s", ceiling, g["copy_r"]),
    ]
    return rows, t


def measure_eviction(
    server: ServerProcess, shape: ModelShape, tokens: int, reps: int
) -> tuple[list[Row], dict[str, object]]:
    """Store throughput with L1 empty vs. L1 full (every store evicts older chunks)."""
    sc = Scenario(block_tokens=16, chunk_tokens=256, mode="engine_driven", engines=1)
    e = SyntheticEngine(shape, sc, tokens, server.port, instance_id=300)
    try:
        empty: list[float] = []
        full: list[float] = []

        def timed_store() -> float:
            return parallel_seconds([lambda: e.store(e.fresh_tokens())])

        for rep in range(reps + 1):
            e.client.clear()
            seconds = timed_store()
            if rep:
                empty.append(seconds)
        capacity = server.status()["l1"]["capacity_bytes"]
        for _ in range(capacity // e.kv_bytes + 1):  # fill L1 to the brim
            e.store(e.fresh_tokens())
        before = server.status()["l1"]
        for rep in range(reps + 1):
            seconds = timed_store()
            if rep:
                full.append(seconds)
        after = server.status()["l1"]
        e.client.clear()
    finally:
        e.close()
    evicted = after["evictions"] - before["evictions"]
    chunks = (reps + 1) * tokens // sc.chunk_tokens
    if evicted < chunks:
        raise RuntimeError(f"eviction phase evicted {evicted} chunks, expected ≥ {chunks}")
    g_empty, g_full = _gbps(e.kv_bytes, empty), _gbps(e.kv_bytes, full)
    note = f"{evicted} chunks evicted during {reps + 1} stores into a full L1 ({after['used_bytes'] / 2**30:.2f} GiB used)"  # noqa: E501
    row = Row("eviction (GB/s)", "store, L1 100% full (steady eviction)", g_full, "GB/s",
              "store, L1 empty (no eviction)", g_empty, EVICTION_TARGET, note)  # fmt: skip
    return [row], {"empty": empty, "full": full, "evicted": evicted}
