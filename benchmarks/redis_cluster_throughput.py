"""The shared tier's throughput as servers are added: 1, 2, 3 `lmcache server`s writing to
and prefetching from one real Redis Cluster (3 masters + 3 replicas) at once, next to the
same-run ceiling of redis-py doing the same bytes from as many processes (issue 14 item 4).

    PYTHONPATH=src python benchmarks/redis_cluster_throughput.py [--servers 1 2 3]
        [--prompts 60] [--chunk-kib 1024] [--writers 1]

Per server count N (the cluster flushed in between):
    write     each server's engine stores --prompts prompts of 3 chunks at once; timed until
              every server's write-behind queue has put them all into the cluster (GB/s of
              chunk bytes, all servers together)
    prefetch  each server looks up the prompts another server stored: loads from the
              cluster into its L1 (GB/s, all servers together)
    redis-py  N processes of the plain redis-py client (hiredis parser, its own packer),
              each SET (pipelines of 8, keys spread over the slots) then GET of the same
              number of values of the chunk size: what an application gets from redis-py
              against the same cluster in the same run
Every server is its own process with its own shm dir; on a machine with few cores the
servers, the 6 redis-servers and this driver share them, so the figures say how the
tier scales *here*; the output of one run is in benchmarks/results/.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import redis.cluster
from _cluster import cluster_hosts

from lmcache.bench.cluster_load import BLOCK, CHUNK, MODEL, l2_status
from lmcache.cluster_processes import RedisCluster


def redis_py(url: str, n: int, size: int, seed: int, *, out: Any, go: Any) -> None:
    client = redis.cluster.RedisCluster.from_url(url)
    value = os.urandom(size)
    names = [f"ceiling:{{{seed}-{i}}}:0" for i in range(n)]
    go.wait()  # every process connected: start together
    t0 = time.perf_counter()
    for i in range(0, n, 8):
        pipe = client.pipeline(transaction=False)
        for name in names[i : i + 8]:
            pipe.set(name, value)
        pipe.execute()
    t1 = time.perf_counter()
    for i in range(0, n, 8):
        pipe = client.pipeline(transaction=False)
        for name in names[i : i + 8]:
            pipe.get(name)
        pipe.execute()
    out.put((t0, t1, time.perf_counter()))
    client.close()


def ceiling(url: str, procs: int, n: int, size: int) -> tuple[float, float]:
    ctx = mp.get_context("spawn")
    q, go = ctx.Queue(), ctx.Barrier(procs)
    ps = [
        ctx.Process(target=redis_py, args=(url, n, size, i), kwargs={"out": q, "go": go})
        for i in range(procs)
    ]
    for p in ps:
        p.start()
    times = [q.get(timeout=300) for _ in ps]
    for p in ps:
        p.join()
    total = procs * n * size / 1e9
    write = total / (max(t[1] for t in times) - min(t[0] for t in times))
    read = total / (max(t[2] for t in times) - min(t[1] for t in times))
    return write, read


def run(cluster: RedisCluster, n: int, a: argparse.Namespace) -> str:
    for port in cluster.masters():
        cluster.command(port, "FLUSHALL")
    block_bytes = a.chunk_kib * 1024 // (CHUNK // BLOCK) // 4
    chunk = block_bytes * 4 * (CHUNK // BLOCK)
    args = ("--l2-writers", str(a.writers))
    with cluster_hosts(
        cluster, n, *args, first_iid=200, block_bytes=block_bytes, prefix="lmcache-tp"
    ) as hosts:
        servers = [h.server for h in hosts]
        rng = np.random.default_rng(n)
        prompts = [
            [rng.integers(0, 50_000, size=3 * CHUNK, dtype=np.uint32) for _ in range(a.prompts)]
            for _ in hosts
        ]
        for h in hosts:
            h.engine.blocks[...] = rng.integers(0, 256, size=h.engine.blocks.shape, dtype=np.uint8)
        want = n * a.prompts * 3

        def store(i: int) -> None:
            h = hosts[i]
            for k, tokens in enumerate(prompts[i]):
                h.client.store(f"w{k}", h.iid, tokens, start=0, end=3 * CHUNK,
                               block_ids=range(48))  # fmt: skip

        t0 = time.perf_counter()
        each(n, store)
        while sum(l2_status(s)["stored_objects"] for s in servers) < want:
            time.sleep(0.01)
        write = want * chunk / 1e9 / (time.perf_counter() - t0)

        def fetch(i: int) -> None:
            h, theirs = hosts[i], prompts[(i + 1) % n]
            for k, tokens in enumerate(theirs):
                h.client.lookup(f"p{k}", tokens, model_name=MODEL, world_size=1,
                                dtype="bfloat16")  # fmt: skip
            for k in range(len(theirs)):
                while h.client.query_lookup(f"p{k}") is None:
                    time.sleep(0.002)
                h.client.end_session(f"p{k}")

        for s in servers:  # L1 only: what is looked up next comes from the cluster
            s.http_json("POST", "/clear-cache")
        before = sum(int(l2_status(s)["prefetched_objects"]) for s in servers)
        t0 = time.perf_counter()
        each(n, fetch)
        took = time.perf_counter() - t0
        loaded = sum(int(l2_status(s)["prefetched_objects"]) for s in servers) - before
        read = loaded * chunk / 1e9 / took
    for port in cluster.masters():
        cluster.command(port, "FLUSHALL")
    c_write, c_read = ceiling(cluster.url, n, want // n, chunk)
    return (f"{n} server(s)  write {write:6.3f} GB/s ({write / c_write:4.0%} of redis-py "
            f"{c_write:.3f})  prefetch {read:6.3f} GB/s ({read / c_read:4.0%} of redis-py "
            f"{c_read:.3f}); {loaded}/{want} chunks prefetched")  # fmt: skip


def each(n: int, fn: Callable[[int], object]) -> None:
    threads = [threading.Thread(target=fn, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--servers", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--prompts", type=int, default=60, help="per server, 3 chunks each")
    p.add_argument("--chunk-kib", type=int, default=1024)
    p.add_argument("--writers", type=int, default=1, help="the servers' --l2-writers")
    a = p.parse_args()
    cluster = RedisCluster.start(maxmemory_mb=1024)
    try:
        print(f"3 masters + 3 replicas on loopback, {os.cpu_count()} CPUs; chunk "
              f"{a.chunk_kib} KiB, {a.prompts} prompts x 3 chunks per server, "
              f"--l2-writers {a.writers}")  # fmt: skip
        for n in a.servers:
            print(run(cluster, n, a), flush=True)
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
