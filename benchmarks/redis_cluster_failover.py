"""Failover, resharding and a node's return on a real Redis Cluster, under continuous
traffic through several `lmcache server`s that share nothing but the cluster (issue 14).

    PYTHONPATH=src python benchmarks/redis_cluster_failover.py [--servers 2] [--steady-s 5]
        [--resume-s 30] [--reshard-slots 2000] [--chunk-kib 512] [--node-timeout-ms 2000]
        [--breaker-s 5] [--maxmemory-mb 256]

A 3-master/3-replica cluster (`lmcache.cluster_processes.RedisCluster`), N servers each
with its own shared-memory dir and synthetic engine, and the load of
`lmcache.bench.cluster_load`: host k stores a new prompt, host k+1 looks it up and
retrieves it from L2 and compares every byte. Printed per event (its window lasts until
the next event): reads, full hits, misses, errors, wrong bytes, seconds until a prompt
stored after the event was a full hit, /healthcheck polls that were not 200 or said
degraded; then the write-behind queues and the servers' memory. The output of one run is
kept in benchmarks/results/redis_cluster_failover.txt.
"""

from __future__ import annotations

import argparse
import os
import time

from _cluster import cluster_hosts

from lmcache.bench.cluster_load import Load, failover_scenario
from lmcache.cluster_processes import RedisCluster


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--servers", type=int, default=2)
    p.add_argument("--steady-s", type=float, default=5.0)
    p.add_argument("--resume-s", type=float, default=30.0)
    p.add_argument("--reshard-slots", type=int, default=2000)
    p.add_argument("--chunk-kib", type=int, default=512, help="bytes of one chunk, KiB")
    p.add_argument("--node-timeout-ms", type=int, default=2000)
    p.add_argument("--maxmemory-mb", type=int, default=256, help="per node, allkeys-lru")
    p.add_argument("--breaker-s", type=float, default=5.0, help="the servers' --l2-breaker-s")
    a = p.parse_args()
    block_bytes = a.chunk_kib * 1024 // 16 // 4  # 16 blocks per chunk, 4 layers
    t0 = time.monotonic()
    cluster = RedisCluster.start(node_timeout_ms=a.node_timeout_ms, maxmemory_mb=a.maxmemory_mb)
    up = time.monotonic() - t0
    print(f"cluster: 3 masters + 3 replicas up in {up:.1f}s, cluster-node-timeout "
          f"{a.node_timeout_ms} ms, maxmemory {a.maxmemory_mb} MiB per node (allkeys-lru); "
          f"{os.cpu_count()} CPUs")  # fmt: skip
    args = ("--l2-breaker-s", str(a.breaker_s))
    try:
        with cluster_hosts(
            cluster, a.servers, *args, first_iid=100, block_bytes=block_bytes, prefix="lmcache-host"
        ) as hosts:
            print(f"{a.servers} servers (one shm dir each), chunk {a.chunk_kib} KiB, "
                  f"3 chunks per prompt; timeout_s 2 (default), "
                  f"--l2-breaker-s {a.breaker_s:g}\n")  # fmt: skip
            outcome = failover_scenario(
                cluster, Load(hosts).start(), steady_s=a.steady_s, resume_s=a.resume_s,
                reshard_slots=a.reshard_slots,
            )  # fmt: skip
            print(outcome.report())
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
