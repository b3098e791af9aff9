"""What the Redis Cluster benchmarks share: `lmcache server`s standing for hosts that share
nothing but one cluster (each its own shared-memory dir and synthetic engine, as
`lmcache.bench.cluster_load.Host`), started on it and all taken down again. The cluster
itself is `lmcache.cluster_processes.RedisCluster`."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator

from lmcache.bench.cluster_load import Host
from lmcache.cluster_processes import RedisCluster
from lmcache.processes import ServerProcess


def cluster_adapter(cluster: RedisCluster) -> str:
    """The servers' --l2-adapter: the cluster, every node a seed."""
    return f'{{"type": "redis", "url": "{cluster.seeds_url}", "cluster": true}}'


@contextlib.contextmanager
def cluster_hosts(
    cluster: RedisCluster, count: int, *server_args: str, first_iid: int, block_bytes: int,
    prefix: str,
) -> Iterator[list[Host]]:  # fmt: skip
    """``count`` hosts on ``cluster``: servers with a 1 GB L1 and ``server_args``, each with
    its own shm dir (``prefix``-named) and an engine registered as ``first_iid`` + i. On
    exit the engines are closed, the servers stopped and the dirs removed."""
    dirs = [tempfile.TemporaryDirectory(prefix=f"{prefix}{i}-") for i in range(count)]
    servers: list[ServerProcess] = []
    hosts: list[Host] = []
    try:
        for i, d in enumerate(dirs):
            servers.append(ServerProcess.start(
                "--l1-size-gb", "1", "--l2-adapter", cluster_adapter(cluster), *server_args,
                env={"LMCACHE_SHM_DIR": d.name},
            ))  # fmt: skip
            hosts.append(Host.attach(servers[-1], first_iid + i, d.name, block_bytes=block_bytes))
        yield hosts
    finally:
        for h in hosts:
            h.close()
        for s in servers:
            s.stop()
        for d in dirs:
            d.cleanup()
