"""Shared fixtures: real `lmcache server` and `redis-server` processes (`lmcache.processes`,
the same ones `lmcache bench` starts), and a synthetic engine."""

from __future__ import annotations

import os
import signal
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Unpack

import httpx
import numpy as np

# At collection: numpy.random's lazy first import inside a test, beside server threads, once
# failed with CPython 3.11's `_ModuleLock` KeyError.
import numpy.random
import pytest

from lmcache import processes
from lmcache.client import LMCacheClient, ModelFields, Tokens
from lmcache.cluster_processes import RedisCluster
from lmcache.engine.shm_kv import ShmKVCache
from lmcache.processes import RedisProcess, RedisUnavailable

from .shm_leaks import ShmWatch

TESTS = Path(__file__).parent

_SHM = ShmWatch()
_SHM_LEAKS: list[str] = []


def pytest_sessionstart(session: pytest.Session) -> None:
    _SHM.start()


# How `scripts/test` spreads the tests over parallel workers (pytest-xdist, --dist loadfile):
# each module runs whole on one worker, so its fixtures (a vLLM start, a Redis cluster, the
# chaos run) are made once (--dist loadgroup set module fixtures up twice). Modules of a
# minute or more go first, longest first, so that the workers finish on short modules, not
# on a long one. (All vLLM modules on one worker was tried: slower on 2 cores.)
LONG_FIRST = ("test_images.py", "vllm/test_vllm_resilience.py", "vllm/test_vllm_l2.py",
              "vllm/test_vllm_remote.py", "vllm/", "test_chaos.py", "test_bench.py",
              "test_redis_cluster.py", "test_containers.py")  # fmt: skip


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def where(item: pytest.Item) -> str:
        return item.path.relative_to(TESTS).as_posix()

    def rank(item: pytest.Item) -> int:
        rel = where(item)
        return next((i for i, p in enumerate(LONG_FIRST) if rel.startswith(p)), len(LONG_FIRST))

    items.sort(key=rank)  # stable: the order inside each module stays


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run that left shared memory behind (`tests/shm_leaks.py` says what counts)."""
    _SHM_LEAKS[:] = _SHM.leaks()
    if _SHM_LEAKS and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _SHM_LEAKS:
        terminalreporter.section("left behind in shared memory", sep="=", red=True)
        for line in _SHM_LEAKS:
            terminalreporter.line(f"  {line}", red=True)


@pytest.fixture(scope="session", autouse=True)
def _logs_in_pytest_temp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The logs of the servers and vLLMs a test run starts go to pytest's own temporary
    directory (pytest keeps the last three runs' and removes older ones), not into /tmp
    for good."""
    before = tempfile.tempdir
    tempfile.tempdir = str(tmp_path_factory.mktemp("logs"))
    yield
    tempfile.tempdir = before


@dataclass
class ServerProcess(processes.ServerProcess):
    """`lmcache.processes.ServerProcess` plus the clients a test opened (closed at stop)."""

    clients: list[LMCacheClient] = field(default_factory=list)

    def client(self, timeout: float = 10.0) -> LMCacheClient:
        c = LMCacheClient.connect("localhost", self.port, timeout=timeout)
        self.clients.append(c)
        return c

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=10)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        for c in self.clients:
            c.close()
        return super().stop(sig)


def start_server(*args: str, env: dict[str, str] | None = None, wait: bool = True) -> ServerProcess:
    """A server with a small L1 (0.25 GiB; ``args`` may override it)."""
    server = ServerProcess.start("--l1-size-gb", "0.25", *args, env=env, wait=wait, timeout=30)
    assert isinstance(server, ServerProcess)
    return server


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    s = start_server("--lock-ttl-s", "30")
    yield s
    s.stop()


# A small model: 4 layers, K and V planes, 64 blocks of 16 tokens, 1 KiB per plane-block.
CHUNK = 256
BLOCK = 16

MODEL: ModelFields = {"model_name": "m", "world_size": 1, "dtype": "bfloat16"}
"""The model most tests register and look up with: ``client.lookup(rid, tokens, **MODEL)``."""


class LookupFields(ModelFields, total=False):
    """`lookup_hit`'s keywords: the model, and the optional ones of `LMCacheClient.lookup`."""

    kv_spec: str
    cache_salt: str
    block_size: int


@pytest.fixture
def engine() -> Iterator[ShmKVCache]:
    kv = ShmKVCache(num_layers=4, num_blocks=64, block_size=BLOCK, block_bytes=2048, planes=2)
    yield kv
    kv.close()


def fill_random(kv: ShmKVCache, seed: int) -> None:
    rng = np.random.default_rng(seed)
    kv.blocks[...] = rng.integers(0, 256, size=kv.blocks.shape, dtype=np.uint8)


def register(client: LMCacheClient, kv: ShmKVCache, instance_id: int, model: str = "m") -> None:
    client.register(
        instance_id,
        model_name=model,
        world_size=1,
        rank=0,
        dtype="bfloat16",
        layout=kv.layout,
        memory=kv.memory,
    )


_counter = iter(range(10**9))


def unique_tokens(n: int, seed: int | None = None) -> np.ndarray:
    rng = np.random.default_rng(next(_counter) if seed is None else seed)
    return rng.integers(0, 50_000, size=n, dtype=np.uint32)


def start_redis(port: int | None = None, **settings: Any) -> RedisProcess:
    """A real redis-server on loopback (no persistence; ``settings``: `RedisProcess.start`'s
    ``args`` / ``env``); the test skips without one, unless LMCACHE_REQUIRE_REDIS=1 (CI),
    where that is an error."""
    try:
        return RedisProcess.start(port, **settings)
    except RedisUnavailable:
        if os.environ.get("LMCACHE_REQUIRE_REDIS") == "1":
            raise
        pytest.skip("redis-server is not installed")


def start_redis_cluster(
    masters: int = 3, replicas: int = 1, password: str | None = None
) -> RedisCluster:
    """A real Redis Cluster on loopback (`RedisCluster`: 3 masters, 3 replicas, node
    timeout 1 s); skipped without redis-server/redis-cli, an error under
    LMCACHE_REQUIRE_REDIS=1."""
    try:
        return RedisCluster.start(masters, replicas, password=password)
    except RedisUnavailable:
        if os.environ.get("LMCACHE_REQUIRE_REDIS") == "1":
            raise
        pytest.skip("redis-server/redis-cli are not installed")


def lookup_hit(
    client: LMCacheClient,
    request_id: str,
    tokens: Tokens,
    timeout: float = 10,
    **model: Unpack[LookupFields],
) -> int:
    """Lookup, then poll while the server is still loading from L2."""
    hit = client.lookup(request_id, tokens, **model)
    deadline = time.monotonic() + timeout
    while hit is None:
        assert time.monotonic() < deadline, "lookup stayed pending"
        time.sleep(0.01)
        hit = client.query_lookup(request_id)
    return hit
