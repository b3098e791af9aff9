"""How `RedisL2` asks redis-py's ``RedisCluster`` to follow a Cluster that changes under it
(failover, resharding, a seed that is down), kept apart from the adapter's data path.

    seeds:  every node the URL names (``redis+cluster://h1:p1,h2:p2``) is a startup node,
            and the client connects as soon as the adapter is made (`connect_soon`, in
            the background: a cluster that is down does not hold up the server's start).
            Once connected, redis-py keeps every node it discovered as a startup node; a
            client first made after its one seed died could not find the cluster at all
            ("Redis Cluster cannot be connected"), and a server's first L2 call may come
            long after its start.
    map:    ``reinitialize_steps=1``: every MOVED / connection error / CLUSTERDOWN reloads
            the slot map (CLUSTER SLOTS, one small reply) instead of patching one slot or
            waiting for the 5th error. redis-py counts those errors per pipeline object,
            and our transactions (every put, every Cluster get) use a new pipeline each
            time, so with the default of 5 a transaction never reached the 5th error and
            never reloaded the map: after a master died, a server whose only traffic
            was writes kept sending them to the dead node for good (issue 14).

Measured on a real 3-master/3-replica cluster: ``tests/test_redis_cluster.py`` and
``benchmarks/redis_cluster_failover.py``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from redis.cluster import ClusterNode

from lmcache.storage.l2.redis_url import RedisTarget

logger = logging.getLogger(__name__)


def cluster_options(target: RedisTarget) -> dict[str, Any]:
    """Keyword arguments for ``RedisCluster.from_url(target.url, ...)`` beyond the
    connection options a single server takes too."""
    return {
        "startup_nodes": [ClusterNode(host, port) for host, port in target.seeds],
        "reinitialize_steps": 1,
    }


def connect_soon(connect: Callable[[], object], name: str) -> None:
    """Call ``connect`` once in a daemon thread; a failure is left to the first real call
    (which retries, counts and reports it), so it is only logged at DEBUG here."""

    def run() -> None:
        try:
            connect()
        except Exception as exc:
            logger.debug("%s: early connect failed: %s", name, type(exc).__name__)

    threading.Thread(target=run, name="redis-cluster-connect", daemon=True).start()
