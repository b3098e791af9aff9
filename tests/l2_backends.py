"""The L2 adapters' test harness: one `Backend` per adapter (memory, fs in a tmp dir, Redis
and a one-node Redis Cluster on real ``redis-server`` processes), with the raw access the
contract needs to break stored objects, and the fixtures that make them.

    backend fixture (params: memory | fs | redis | redis-cluster)
        .make(**opts)        a new adapter on the same storage (fs: same dir; redis: same prefix)
        .corrupt(a, key, i)  flip stored payload byte i (memory: mutate; fs: edit the file;
                             redis: SETRANGE the part that holds it)
        .tear(a, key)        drop the payload's tail (memory/fs: truncate; redis: delete a part)
        .plant_foreign(a)    data that is not this adapter's; .foreign_intact() checks it

A test module imports the fixtures it uses (``backend`` needs ``redis_server`` and
``redis_cluster`` there too); module-scoped ones start one server per module. Redis
servers run on free loopback ports; without redis-server the tests that need one skip,
unless ``LMCACHE_REQUIRE_REDIS`` is "1".
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from lmcache.cluster_processes import free_cluster_port
from lmcache.processes import free_port
from lmcache.storage.l2.base import GiB, L2Adapter
from lmcache.storage.l2.format import HEADER_SIZE
from lmcache.storage.l2.fs import FsL2
from lmcache.storage.l2.memory import MemoryL2
from lmcache.storage.l2.redis import RedisL2
from lmcache.types import ObjectKey

MiB = 1 << 20
REDIS_SERVER = shutil.which("redis-server")


def key(i: int) -> ObjectKey:
    return ObjectKey(b"ns-l2-contract--" + hashlib.sha256(i.to_bytes(8, "big")).digest())


def blob(n: int, seed: int = 0) -> bytes:
    return (bytes(range(seed % 251, 251)) + bytes(range(seed % 251))) * (n // 251) + bytes(n % 251)


def need_redis() -> None:
    if REDIS_SERVER:
        return
    if os.environ.get("LMCACHE_REQUIRE_REDIS") == "1":
        pytest.fail("LMCACHE_REQUIRE_REDIS=1 but redis-server is not installed")
    pytest.skip("redis-server is not installed (set LMCACHE_REQUIRE_REDIS=1 to require it)")


# ----- real redis-server processes ---------------------------------------------------------


@dataclass
class RedisServer:
    port: int
    workdir: Path
    args: tuple[str, ...] = ()
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        assert REDIS_SERVER
        argv = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        argv += ["--appendonly", "no", "--dir", str(self.workdir), *self.args]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = self.client()
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.AuthenticationError:
                break  # up, and wants a password
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server on port {self.port} did not start") from None
                time.sleep(0.02)
        client.close()
        return self

    def client(self, **kw: Any) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=5, retry=Retry(NoBackoff(), 0), **kw)

    def stop(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(sig)
            self.proc.wait(10)
            self.proc = None


def start_cluster_node(workdir: Path) -> RedisServer:
    """A one-node Redis Cluster that serves every slot."""
    conf = ("--cluster-enabled", "yes", "--cluster-config-file", str(workdir / "nodes.conf"))
    node = RedisServer(free_cluster_port(), workdir, conf).start()
    client = node.client()
    try:
        client.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
    except redis.ResponseError:  # Redis 6
        client.execute_command("CLUSTER", "ADDSLOTS", *range(16384))
    client.close()
    return wait_cluster_ok(node)


def wait_cluster_ok(node: RedisServer) -> RedisServer:
    client = node.client()
    deadline = time.monotonic() + 10
    while b"cluster_state:ok" not in client.execute_command("CLUSTER", "INFO"):
        assert time.monotonic() < deadline, "cluster did not come up"
        time.sleep(0.05)
    client.close()
    return node


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    need_redis()
    server = RedisServer(free_port(), tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    need_redis()
    node = start_cluster_node(tmp_path_factory.mktemp("redis-cluster"))
    yield node
    node.stop()


# ----- one backend per adapter -------------------------------------------------------------


@dataclass
class Backend:
    kind: str
    make: Callable[..., L2Adapter]
    redis: redis.Redis | None = None  # raw access to the server under test
    prefix: str = ""
    opened: list[L2Adapter] = field(default_factory=list)
    foreign: dict[str, bytes] = field(default_factory=dict)

    def new(self, **opts: Any) -> L2Adapter:
        adapter = self.make(**opts)
        self.opened.append(adapter)
        return adapter

    def part_name(self, k: ObjectKey, part: int) -> str:
        return f"{self.prefix}{{{k.hex()}}}:{part}"

    def corrupt(self, a: L2Adapter, k: ObjectKey, offset: int) -> None:
        if isinstance(a, MemoryL2):
            a._objects[k][HEADER_SIZE + offset] ^= 0xFF
        elif isinstance(a, FsL2):
            with open(a.path_of(k), "r+b") as f:
                f.seek(HEADER_SIZE + offset)
                (b,) = f.read(1)
                f.seek(HEADER_SIZE + offset)
                f.write(bytes([b ^ 0xFF]))
        else:
            assert isinstance(a, RedisL2) and self.redis is not None
            name = self.part_name(k, offset // a.part_size)
            old = self.redis.getrange(name, offset % a.part_size, offset % a.part_size)
            assert isinstance(old, bytes)  # a client without decode_responses
            self.redis.setrange(name, offset % a.part_size, bytes([old[0] ^ 0xFF]))

    def tear(self, a: L2Adapter, k: ObjectKey) -> None:
        if isinstance(a, MemoryL2):
            del a._objects[k][-1:]
        elif isinstance(a, FsL2):
            os.truncate(a.path_of(k), os.path.getsize(a.path_of(k)) - 1)
        else:
            assert isinstance(a, RedisL2) and self.redis is not None
            assert self.redis.delete(self.part_name(k, 1)) == 1

    def plant_foreign(self, a: L2Adapter) -> L2Adapter | None:
        """Data that `a.clear()` must leave alone; returns a sibling adapter, if any."""
        if isinstance(a, FsL2):
            root = Path(a.root)
            (root / "ab" / "cd").mkdir(parents=True, exist_ok=True)
            for name in ("notes.txt", "ab/cd/other.bin", f"ab/cd/{'ab' * 48}.kv.bak"):
                (root / name).write_bytes(b"keep me")
                self.foreign[name] = b"keep me"
            return None
        if isinstance(a, RedisL2):
            assert self.redis is not None
            for name in ("unrelated", f"{self.prefix}plain", f"{self.prefix}x{{{'ab' * 48}}}:m"):
                self.redis.set(name, b"keep me")
                self.foreign[name] = b"keep me"
            return self.new(key_prefix=self.prefix + "sibling:")
        return self.new()

    def foreign_intact(self, a: L2Adapter) -> bool:
        if isinstance(a, FsL2):
            return all((Path(a.root) / n).read_bytes() == v for n, v in self.foreign.items())
        if self.redis is not None:
            return all(self.redis.get(n) == v for n, v in self.foreign.items())
        return True


@pytest.fixture(params=["memory", "fs", "redis", "redis-cluster"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    kind: str = request.param
    if kind == "memory":
        b = Backend(kind, MemoryL2)
    elif kind == "fs":
        b = Backend(kind, lambda **o: FsL2(tmp_path / "l2", **o))
    else:
        server: RedisServer = request.getfixturevalue(
            "redis_server" if kind == "redis" else "redis_cluster"
        )
        prefix = f"t{uuid.uuid4().hex[:8]}:"
        scheme = "redis+cluster" if kind == "redis-cluster" else "redis"

        def make(**o: Any) -> L2Adapter:
            o.setdefault("key_prefix", prefix)
            return RedisL2(f"{scheme}://127.0.0.1:{server.port}", timeout_s=5, **o)

        b = Backend(kind, make, redis=server.client(), prefix=prefix)
    yield b
    for a in b.opened:
        a.close()
    if b.redis is not None:
        b.redis.close()


def capacity_gb(nbytes: int) -> float:
    return nbytes / GiB
