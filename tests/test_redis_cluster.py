"""Two `lmcache server`s standing for two hosts (separate shared-memory dirs, separate
engines) share a real 3-master/3-replica Redis Cluster (`lmcache.cluster_processes`), under
continuous store/lookup/retrieve traffic with every hit checked byte for byte
(`lmcache.bench.cluster_load`): a master is SIGKILLed, slots are resharded, the dead node
comes back. Wrong bytes are 0 always; hits resume within ``RESUME_S`` of each event; no
server ever says unhealthy (degraded is fine); the write-behind queue drains."""

from __future__ import annotations

import contextlib
import hashlib
import re
import tempfile
import time
from collections.abc import Iterator

import pytest
import redis

from lmcache.bench.cluster_load import Host, Load, failover_scenario
from lmcache.cluster_processes import RedisCluster
from lmcache.storage.l2.base import L2Error
from lmcache.storage.l2.redis import RedisL2
from lmcache.types import ObjectKey

from .conftest import ServerProcess, start_redis_cluster, start_server

# After an event's action (failover, reshard, restart) is done: the server's L2 breaker
# (5 s after an error) + a prompt's store and read (0.2 s lag) + slack for a loaded machine.
RESUME_S = 10.0


def adapter(cluster: RedisCluster) -> str:
    """One seed, the node the test kills (issue 14's case; several seeds are safer)."""
    return f'{{"type": "redis", "url": "{cluster.url}", "cluster": true, "timeout_s": 1.0}}'


@pytest.fixture
def cluster() -> Iterator[RedisCluster]:
    c = start_redis_cluster()
    yield c
    c.stop()


@pytest.fixture
def hosts(cluster: RedisCluster) -> Iterator[list[Host]]:
    """Two servers that share nothing but the cluster: each its own /dev/shm stand-in."""
    with tempfile.TemporaryDirectory(prefix="lmcache-host-a-") as a_shm, \
         tempfile.TemporaryDirectory(prefix="lmcache-host-b-") as b_shm:  # fmt: skip
        servers: list[ServerProcess] = []
        out: list[Host] = []
        try:
            for i, shm in enumerate((a_shm, b_shm)):
                servers.append(
                    start_server("--l2-adapter", adapter(cluster), env={"LMCACHE_SHM_DIR": shm})
                )
                out.append(Host.attach(servers[-1], 10 + i, shm))
            yield out
        finally:
            for h in out:
                h.close()
            for s in servers:
                s.stop()


def test_failover_reshard_and_restart_under_load(cluster: RedisCluster, hosts: list[Host]) -> None:
    """Store through one host, hit through the other, all the time; a master dies (the
    servers' only seed), slots move, the dead node comes back. Figures per event in the
    failure message."""
    seed = cluster.nodes[0].port
    assert seed in cluster.masters() and cluster.url.endswith(f":{seed}")
    outcome = failover_scenario(
        cluster, Load(hosts).start(), steady_s=1.0, resume_s=RESUME_S, victim=seed
    )
    report = outcome.report()
    for f in outcome.figures:
        assert f.resume_s is not None and f.resume_s <= RESUME_S + f.action_s, report
        assert f.wrong_bytes == 0 and f.unhealthy_polls == 0, report
    assert sum(f.full_hits for f in outcome.figures) > 50, report
    assert outcome.drained, report
    for warm, end in outcome.rss_mib:  # L1 (0.25 GiB) may fill; nothing else may grow
        assert end < warm + 256 + 64, report


def test_a_writer_follows_a_failover(cluster: RedisCluster) -> None:
    """An adapter that only writes (a server whose lookups all hit L1) reloads the slot
    map after its errors: with redis-py's default it never did, and kept writing to the
    dead master for good (issue 14)."""
    a = RedisL2(cluster.url, cluster=True, timeout_s=1.0)
    keys = [ObjectKey(hashlib.sha384(bytes([i])).digest()) for i in range(40)]
    data = b"x" * 100_000
    for k in keys:
        a.put(k, data)
    victim = cluster.owner(cluster.slot_of(f"lmcache:{{{keys[0].hex()}}}:m"))
    cluster.kill(victim)
    cluster.wait_failover(victim, timeout=30)
    failures = 0
    for _ in range(3):  # a first error may reload the map; then every put goes through
        failures = 0
        for k in keys:
            try:
                a.put(k, data)
            except L2Error:
                failures += 1
        if not failures:
            break
    assert failures == 0, a.stats()["last_error"]
    a.close()


def test_a_client_made_while_a_seed_is_down_finds_the_cluster(cluster: RedisCluster) -> None:
    """An adapter connects when it is made and so learns every node: its first call after
    its one seed died still reaches the cluster. One made after the seed died cannot with
    that seed alone; with several seeds in the URL it can."""
    first = cluster.nodes[0].port
    early = RedisL2(f"redis://127.0.0.1:{first}", cluster=True, timeout_s=0.5)
    deadline = time.monotonic() + 10
    while early._client is None:  # the background connect (nothing public shows it)
        assert time.monotonic() < deadline
        time.sleep(0.01)
    cluster.kill(first)
    cluster.wait_failover(first, timeout=30)
    late = RedisL2(f"redis://127.0.0.1:{first}", cluster=True, timeout_s=0.5)
    with pytest.raises(L2Error):
        late.exists([ObjectKey(bytes(48))])
    seeds = RedisL2(cluster.seeds_url, cluster=True, timeout_s=0.5)
    key, out = ObjectKey(bytes(48)), bytearray(1000)
    for a in (seeds, early):
        for _ in range(3):  # the first call may still meet the dead node, then reloads
            with contextlib.suppress(L2Error):
                a.put(key, b"y" * 1000)
                break
        assert a.get_into(key, memoryview(out)) and out == b"y" * 1000
        a.delete(key)
    assert seeds.name.count(",") == len(cluster.nodes) - 1
    for a in (early, late, seeds):
        a.close()


def test_objects_spread_over_every_master(cluster: RedisCluster) -> None:
    """The hash tag is the whole object key: one object stays in one slot (its
    transaction needs that), different objects land on every master (no hot slot)."""
    a = RedisL2(cluster.seeds_url, cluster=True, part_mb=1)
    for i in range(300):
        a.put(ObjectKey(hashlib.sha384(i.to_bytes(2, "big")).digest()), b"v" * 10)
    sizes = [int(cluster.command(p, "DBSIZE")) for p in cluster.masters()]
    assert sum(sizes) == 2 * 300 and all(150 < n < 250 for n in sizes), sizes  # meta + part
    assert a.clear() == 300
    a.close()
    # Every node runs with the jemalloc setting our single servers use (`REDIS_ENV`).
    for port in cluster.masters():
        stats = cluster.command(port, "MEMORY", "MALLOC-STATS")
        if "opt.dirty_decay_ms" in stats:  # a jemalloc build
            assert re.search(r"opt\.dirty_decay_ms: -1\b", stats), stats[:2000]


def test_credentials_on_a_cluster_never_show() -> None:
    """A cluster that wants a password: the adapter reaches every node with it, through a
    failover too, and neither its name, its stats nor its errors show it."""
    password = "Cl-pa55"
    cluster = start_redis_cluster(password=password)
    try:
        with pytest.raises(redis.RedisError, match=r"(?i)auth"):  # it does want one
            redis.Redis(port=cluster.nodes[0].port, socket_timeout=5).ping()
        a = RedisL2(cluster.seeds_url, cluster=True, timeout_s=1.0)
        keys = [ObjectKey(hashlib.sha384(bytes([i])).digest()) for i in range(30)]
        for k in keys:
            a.put(k, b"secret-kv" * 100)
        victim = cluster.masters()[0]
        cluster.kill(victim)
        with contextlib.suppress(L2Error):  # the first call may still meet the dead node
            for k in keys:
                a.put(k, b"secret-kv" * 100)
        cluster.wait_failover(victim, timeout=30)
        out = bytearray(900)
        hits = 0
        for _ in range(3):
            with contextlib.suppress(L2Error):
                hits = sum(a.get_into(k, memoryview(out)) for k in keys)
                break
        assert hits >= 1 and out == b"secret-kv" * 100
        shown = f"{a.name} {a.stats()} {a!r}"
        assert a.stats()["last_error"] is not None
        assert password not in shown, shown
        a.close()
    finally:
        cluster.stop()
