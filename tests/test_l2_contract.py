"""One contract, every L2 adapter: memory, fs (tmp dir), Redis and Redis Cluster (real servers).

    backend fixture (params: memory | fs | redis | redis-cluster)
        .make(**opts)        a new adapter on the same storage (fs: same dir; redis: same prefix)
        .corrupt(a, key, i)  flip stored payload byte i (memory: mutate; fs: edit the file;
                             redis: SETRANGE the part that holds it)
        .tear(a, key)        drop the payload's tail (memory/fs: truncate; redis: delete a part)
        .plant_foreign(a)    data that is not this adapter's; .foreign_intact() checks it

Redis tests start their own ``redis-server`` on free loopback ports. They are skipped
only when redis-server is not installed and ``LMCACHE_REQUIRE_REDIS`` is not "1".
A dead Redis raises `L2Error` from every method (get_into and exists included: the
server then knows to skip the adapter for a while instead of counting misses).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import threading
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
from lmcache.errors import ConfigError
from lmcache.processes import free_port
from lmcache.storage.l2 import make_adapter
from lmcache.storage.l2.base import GiB, L2Adapter, L2Error
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


# ----- the contract ------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 4 * MiB + 1, 40 * MiB])
def test_put_exists_get_byte_exact(backend: Backend, size: int) -> None:
    a = backend.new()
    k, data = key(1), blob(size, seed=size)
    assert a.exists([k]) == [False]
    a.put(k, memoryview(data))
    assert a.exists([k]) == [True]
    out = bytearray(b"\xee" * size)
    assert a.get_into(k, memoryview(out)) is True
    assert out == data


def test_exists_is_one_batched_query(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    a = backend.new()
    keys = [key(i) for i in range(40)]
    for k in keys[::3]:
        a.put(k, b"x" * 100)
    expected = [i % 3 == 0 for i in range(40)]
    if isinstance(a, RedisL2):
        client = a._connect()
        calls: list[str] = []
        real_pipeline = client.pipeline

        def pipeline(**kw: Any) -> Any:
            calls.append("pipeline")
            return real_pipeline(**kw)

        monkeypatch.setattr(client, "pipeline", pipeline)
        monkeypatch.setattr(client, "execute_command", lambda *a, **k: calls.append("command"))
        assert a.exists(keys) == expected
        assert calls == ["pipeline"]  # one pipeline = one round trip; no single commands
    else:
        assert a.exists(keys) == expected
    assert a.exists([]) == []


def test_miss_leaves_out_alone(backend: Backend) -> None:
    a = backend.new()
    out = bytearray(b"\xab" * 1000)
    assert a.get_into(key(7), memoryview(out)) is False
    assert out == b"\xab" * 1000
    assert a.stats()["misses"] == 1


def test_overwrite_with_other_sizes(backend: Backend) -> None:
    a = backend.new(part_mb=1) if backend.redis is not None else backend.new()
    k = key(2)
    for size in (3 * MiB + 5, MiB // 2, 0, 2 * MiB):
        a.put(k, blob(size, seed=size))
        out = bytearray(size)
        assert a.get_into(k, memoryview(out)) and out == blob(size, seed=size)
    if backend.redis is not None:  # the 3-part object's third part is gone
        assert backend.redis.exists(backend.part_name(k, 2)) == 0


def test_delete(backend: Backend) -> None:
    a = backend.new()
    k1, k2 = key(1), key(2)
    a.put(k1, blob(5 * MiB))
    a.put(k2, b"two")
    a.delete(k1)
    a.delete(key(3))  # absent: no error
    assert a.exists([k1, k2]) == [False, True]
    assert a.get_into(k1, memoryview(bytearray(5 * MiB))) is False
    if backend.redis is not None:
        assert backend.redis.keys(f"{backend.prefix}{{{k1.hex()}}}*") == []


def test_clear_removes_only_its_own_objects(backend: Backend) -> None:
    a = backend.new()
    sibling = backend.plant_foreign(a)
    for i in range(5):
        a.put(key(i), blob(1000 + i))
    if sibling is not None:
        sibling.put(key(99), b"sibling")
    assert a.clear() == 5
    assert a.exists([key(i) for i in range(5)]) == [False] * 5
    assert a.stats()["objects"] in (0, None)
    assert backend.foreign_intact(a)
    if sibling is not None:
        out = bytearray(7)
        assert sibling.get_into(key(99), memoryview(out)) and out == b"sibling"
    assert a.clear() == 0


def test_capacity_evicts_least_recently_used(backend: Backend) -> None:
    if backend.redis is not None:
        pytest.skip("Redis adapters are unbounded (Redis' own maxmemory policy applies)")
    size = 300_000
    a = backend.new(max_capacity_gb=capacity_gb(4 * (size + HEADER_SIZE)))
    for i in range(4):
        a.put(key(i), blob(size, seed=i))
    assert a.get_into(key(0), memoryview(bytearray(size)))  # 0 is now the most recent
    a.put(key(4), blob(size, seed=4))
    assert a.exists([key(i) for i in range(5)]) == [True, False, True, True, True]
    s = a.stats()
    assert s["evictions"] == 1 and s["objects"] == 4
    assert s["bytes"] <= s["capacity_bytes"] == 4 * (size + HEADER_SIZE)
    a.put(key(5), blob(5 * size))  # larger than the whole capacity: not stored
    assert a.exists([key(5)]) == [False] and a.stats()["rejected"] == 1
    if isinstance(a, FsL2):
        files = list(Path(a.root).rglob("*.kv"))
        assert len(files) == 4 and sum(f.stat().st_size for f in files) == s["bytes"]


@pytest.mark.parametrize(
    ("policy", "survivors"),
    [
        ("LRU", [True, False, True, True, True]),  # 1: least recently used (0 was read)
        ("LFU", [True, False, False, True, True]),  # 1 and 2: never read (0 and 3 were)
        ("FIFO", [False, True, True, True, True]),  # 0: oldest, reads do not matter
    ],
)
def test_capacity_follows_the_eviction_policy(
    backend: Backend, policy: str, survivors: list[bool]
) -> None:
    """Bounded adapters drop objects in the order of the L1's own policies."""
    if backend.redis is not None:
        pytest.skip("Redis adapters are unbounded (Redis' own maxmemory policy applies)")
    size = 200_000
    a = backend.new(max_capacity_gb=capacity_gb(4 * (size + HEADER_SIZE)), eviction_policy=policy)
    for i in range(4):
        a.put(key(i), blob(size, seed=i))
    out = memoryview(bytearray(size))
    for k in (0, 0, 3):
        assert a.get_into(key(k), out)
    a.put(key(4), blob(size, seed=4))  # over capacity: one object goes ...
    if policy == "LFU":  # ... and for LFU the next newcomer pushes out the other unread one
        assert a.get_into(key(4), out)
        a.put(key(5), blob(size, seed=5))
    assert a.exists([key(i) for i in range(5)]) == survivors
    assert a.stats()["eviction_policy"] == policy
    assert a.stats()["bytes"] <= a.stats()["capacity_bytes"]


@pytest.mark.parametrize("offset", [0, 4 * MiB + 3])
def test_corrupted_payload_is_a_miss_and_deleted(backend: Backend, offset: int) -> None:
    a = backend.new()
    k, size = key(3), 5 * MiB
    a.put(k, blob(size))
    backend.corrupt(a, k, offset)
    assert a.get_into(k, memoryview(bytearray(size))) is False
    assert a.exists([k]) == [False]
    assert a.stats()["corrupted"] == 1 and a.stats()["misses"] == 1
    a.put(k, blob(size))  # and it can be stored again
    out = bytearray(size)
    assert a.get_into(k, memoryview(out)) and out == blob(size)


def test_torn_object_is_a_miss_and_deleted(backend: Backend) -> None:
    a = backend.new()
    k, size = key(4), 5 * MiB
    a.put(k, blob(size))
    backend.tear(a, k)
    assert a.get_into(k, memoryview(bytearray(size))) is False
    assert a.exists([k]) == [False]


def test_wrong_size_is_a_miss_and_deleted(backend: Backend) -> None:
    a = backend.new()
    a.put(key(5), blob(1000))
    assert a.get_into(key(5), memoryview(bytearray(999))) is False
    assert a.exists([key(5)]) == [False]


def test_accepts_numpy_views(backend: Backend) -> None:
    np = pytest.importorskip("numpy")
    a = backend.new()
    src = np.arange(1000, dtype=np.float32)
    a.put(key(6), memoryview(src))
    dst = np.zeros(4000, dtype=np.uint8)
    assert a.get_into(key(6), memoryview(dst))
    assert dst.view(np.float32).tolist() == src.tolist()


def test_stats_counters_move(backend: Backend) -> None:
    a = backend.new()
    s0 = a.stats()
    for field_name in ("type", "name", "objects", "bytes", "capacity_bytes", "last_error"):
        assert field_name in s0
    assert s0["type"] == backend.kind.split("-")[0] and s0["name"] == a.name
    assert s0["healthy"] is True and s0["hits"] == s0["misses"] == s0["errors"] == 0
    a.put(key(1), b"abc")
    a.get_into(key(1), memoryview(bytearray(3)))
    a.get_into(key(2), memoryview(bytearray(3)))
    s = a.stats()
    assert (s["puts"], s["hits"], s["misses"]) == (1, 1, 1)
    if s["objects"] is not None:
        assert (s["objects"], s["bytes"]) == (1, 3 + HEADER_SIZE)


def test_threads_share_one_adapter(backend: Backend) -> None:
    a = backend.new()
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(15):
                k, data = key(t * 100 + i % 4), blob(20_000 + t, seed=t)
                a.put(k, data)
                out = bytearray(len(data))
                assert a.get_into(k, memoryview(out)) and out == data
                assert a.exists([k]) == [True]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    assert a.stats()["errors"] == 0


def test_closed_adapter_refuses_work(backend: Backend) -> None:
    a = backend.new()
    a.close()
    a.close()  # idempotent
    with pytest.raises(L2Error, match="closed"):
        a.put(key(1), b"x")
    assert a.stats()["name"] == a.name


def test_memory_down_switch_simulates_an_outage() -> None:
    a = MemoryL2()
    a.put(key(1), b"x")
    a.down = True
    for call in (lambda: a.put(key(2), b"y"), lambda: a.exists([key(1)]), a.clear):
        with pytest.raises(L2Error, match="down"):
            call()
    assert a.stats()["healthy"] is False and a.stats()["errors"] == 3
    a.down = False
    assert a.exists([key(1)]) == [True] and a.stats()["healthy"] is True


# ----- fs: restarts --------------------------------------------------------------------------


def test_fs_restart_rebuilds_index_from_listing_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = FsL2(tmp_path)
    keys = [key(i) for i in range(1000)]
    for i, k in enumerate(keys):
        first.put(k, blob(64, seed=i))
    first.close()

    def no_reads(*args: object, **kwargs: object) -> None:
        raise AssertionError("the index rebuild must not open or read object files")

    with monkeypatch.context() as m:
        for name in ("open", "readv", "read", "pread", "preadv"):
            m.setattr(os, name, no_reads)
        m.setattr("builtins.open", no_reads)
        start = time.perf_counter()
        second = FsL2(tmp_path)
        elapsed = time.perf_counter() - start
    assert elapsed < 1.0, f"index rebuild took {elapsed:.2f}s"
    assert second.exists(keys) == [True] * 1000
    assert second.stats()["objects"] == 1000
    out = bytearray(64)
    assert second.get_into(keys[500], memoryview(out)) and out == blob(64, seed=500)


def test_fs_restart_drops_temp_and_torn_files(tmp_path: Path) -> None:
    a = FsL2(tmp_path)
    good, torn, in_flight = key(1), key(2), key(3)
    a.put(good, blob(100))
    a.put(torn, blob(100))
    a.close()
    os.truncate(a.path_of(torn), 10)  # shorter than a header: torn by a crash
    temp = Path(a.path_of(in_flight)).parent / f".{in_flight.hex()}.0a1b2c.tmp"
    temp.parent.mkdir(parents=True, exist_ok=True)
    temp.write_bytes(b"half a write")  # a put that died before its rename
    b = FsL2(tmp_path)
    assert b.exists([good, torn, in_flight]) == [True, False, False]
    assert not temp.exists() and not os.path.exists(a.path_of(torn))
    assert b.get_into(in_flight, memoryview(bytearray(12))) is False


def test_fs_restart_orders_lru_by_mtime(tmp_path: Path) -> None:
    a = FsL2(tmp_path)
    for i in range(4):
        a.put(key(i), blob(1000))
    a.close()
    now = time.time()
    for age, i in zip((40, 10, 30, 20), range(4), strict=True):  # oldest: 0, then 2, 3, 1
        os.utime(a.path_of(key(i)), (now - age, now - age))
    b = FsL2(tmp_path, max_capacity_gb=capacity_gb(2 * (1000 + HEADER_SIZE)))
    assert b.exists([key(i) for i in range(4)]) == [False, True, False, True]
    assert b.stats()["evictions"] == 2


def test_fs_hit_touches_mtime_for_the_next_start(tmp_path: Path) -> None:
    a = FsL2(tmp_path)
    a.put(key(1), b"x" * 10)
    old = time.time() - 100
    os.utime(a.path_of(key(1)), (old, old))
    assert a.get_into(key(1), memoryview(bytearray(10)))
    assert os.path.getmtime(a.path_of(key(1))) > old + 50


def test_fs_io_error_raises_l2error_and_marks_unhealthy(tmp_path: Path) -> None:
    a = FsL2(tmp_path)
    a.put(key(1), b"abc")
    os.rename(a.path_of(key(1)), a.path_of(key(1)) + ".moved")
    os.mkdir(a.path_of(key(1)))  # a directory where the file should be: EISDIR on replace
    with pytest.raises(L2Error, match=r"put: IsADirectoryError"):
        a.put(key(1), b"abd")
    assert a.stats()["healthy"] is False and a.stats()["errors"] == 1
    assert "IsADirectoryError" in (a.stats()["last_error"] or "")
    a.put(key(2), b"ok")  # the next success makes it healthy again
    assert a.stats()["healthy"] is True
    assert not list(Path(tmp_path).rglob("*.tmp"))


# ----- config --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({}, "'type' is required"),
        ({"type": "s3"}, "'type' 's3' is unknown; known types: fs, memory, redis"),
        ({"type": "fs"}, "l2 adapter 'fs': 'path' is required"),
        ({"type": "fs", "path": 5}, "'path' must be a string"),
        ({"type": "fs", "path": "/x", "size": 1}, "unknown key(s) 'size'"),
        ({"type": "fs", "path": "/x", "max_capacity_gb": -1}, "'max_capacity_gb' must be"),
        ({"type": "fs", "path": "/x", "max_capacity_gb": "big"}, "'max_capacity_gb' must be"),
        ({"type": "memory", "max_capacity_gb": True}, "'max_capacity_gb' must be"),
        ({"type": "fs", "path": "/x", "eviction_policy": "MRU"}, "'eviction_policy': unknown"),
        ({"type": "memory", "eviction_policy": 3}, "'eviction_policy' must be a string"),
        ({"type": "redis"}, "l2 adapter 'redis': 'url' is required"),
        ({"type": "redis", "url": "http://h:1"}, "'url' scheme must be"),
        ({"type": "redis", "url": "redis://h:99999"}, "'url' is not a valid URL"),
        ({"type": "redis", "url": "redis://h/x"}, "'url' path must be a database number"),
        ({"type": "redis", "url": "redis+cluster://h/3"}, "database must be 0"),
        ({"type": "redis", "url": "redis://h:1,g:2"}, "several hosts only for a Redis Cluster"),
        ({"type": "redis", "url": "redis+cluster://h:1,g:x"}, "not a valid URL"),
        ({"type": "redis", "url": "redis://h", "part_mb": 0}, "'part_mb' must be"),
        ({"type": "redis", "url": "redis://h", "part_mb": 1.5}, "'part_mb' must be an integer"),
        ({"type": "redis", "url": "redis://h", "timeout_s": 0}, "'timeout_s' must be"),
        ({"type": "redis", "url": "redis://h", "retries": -1}, "'retries' must be"),
        ({"type": "redis", "url": "redis://h", "key_prefix": "a{b"}, "'key_prefix' must be"),
        ({"type": "redis", "url": "redis://h", "cluster": "yes"}, "'cluster' must be"),
        ({"type": "redis", "url": "redis://h", "passwd": "x"}, "unknown key(s) 'passwd'"),
    ],
)
def test_bad_configs_name_the_field(config: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        make_adapter(config)
    assert message in str(err.value)


def test_fs_path_that_cannot_be_a_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=r"'path' .* cannot be created"):
        make_adapter({"type": "fs", "path": str(tmp_path / "file" / "sub")})


def test_make_adapter_builds_each_type(tmp_path: Path) -> None:
    fs = make_adapter({"type": "fs", "path": str(tmp_path), "max_capacity_gb": 500})
    assert isinstance(fs, FsL2) and fs.name == f"fs:{tmp_path}"
    assert fs.stats()["capacity_bytes"] == 500 * GiB
    assert isinstance(make_adapter({"type": "memory"}), MemoryL2)
    r = make_adapter({"type": "redis", "url": "valkeys://cache:7000"})
    assert isinstance(r, RedisL2) and r.name == "valkeys://cache:7000/0" and not r.cluster
    c = make_adapter({"type": "redis", "url": "redis://h:7000", "cluster": True, "part_mb": 8})
    assert isinstance(c, RedisL2) and c.cluster and c.part_size == 8 * MiB


# ----- redis: credentials, schemes, failures -------------------------------------------------


def test_redis_credentials_never_leak(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    need_redis()
    secret = "s3cr3t-Pa55"
    server = RedisServer(free_port(), tmp_path, ("--requirepass", secret)).start()
    try:
        url = f"redis://default:{secret}@127.0.0.1:{server.port}/0"
        a = make_adapter({"type": "redis", "url": url})
        a.put(key(1), b"auth works")
        assert a.exists([key(1)]) == [True]
        shown = f"{a.name} {a.stats()} {a!r}"
        monkeypatch.setenv("LMCACHE_REDIS_PASSWORD", secret)
        b = RedisL2(f"valkey://127.0.0.1:{server.port}/0")  # password from the environment
        assert b.exists([key(1)]) == [True]
        shown += f"{b.name} {b.stats()} {b!r}"
        monkeypatch.setenv("LMCACHE_REDIS_PASSWORD", secret + "-wrong")
        c = RedisL2(f"redis://127.0.0.1:{server.port}/0")
        with pytest.raises(L2Error) as err:
            c.exists([key(1)])
        shown += f"{err.value} {c.stats()}"
        server.stop()
        with pytest.raises(L2Error) as err:
            a.put(key(2), b"x")
        shown += f"{err.value} {a.stats()} {err.value.__cause__}"
        assert secret not in shown and "Pa55" not in shown
        assert a.name == f"redis://127.0.0.1:{server.port}/0"
        for x in (a, b, c):
            x.close()
    finally:
        server.stop()


@pytest.mark.parametrize("cluster", [False, True], ids=["redis", "redis-cluster"])
def test_redis_dead_or_stalled_raises_quickly_and_recovers(tmp_path: Path, cluster: bool) -> None:
    need_redis()
    server = start_cluster_node(tmp_path) if cluster else RedisServer(free_port(), tmp_path).start()
    timeout = 0.5
    a = RedisL2(f"redis://127.0.0.1:{server.port}", timeout_s=timeout, retries=2, cluster=cluster)
    k, data = key(1), blob(5 * MiB)
    a.put(k, data)
    out = memoryview(bytearray(len(data)))
    calls: list[tuple[str, Callable[[], object]]] = [
        ("put", lambda: a.put(k, data)),
        ("exists", lambda: a.exists([k])),
        ("get_into", lambda: a.get_into(k, out)),
        ("delete", lambda: a.delete(k)),
        ("clear", a.clear),
    ]

    def all_fail_fast(state: str) -> None:
        for name, call in calls:
            start = time.monotonic()
            with pytest.raises(L2Error):
                call()
            took = time.monotonic() - start
            assert took < timeout + 1, f"{name} with Redis {state} took {took:.2f}s"
            assert a.stats()["healthy"] is False

    try:
        assert server.proc is not None
        server.proc.send_signal(signal.SIGSTOP)  # alive but not answering
        all_fail_fast("stalled")
        server.stop()  # dead: connection refused
        all_fail_fast("dead")
        assert a.stats()["errors"] == 10 and a.stats()["last_error"]
        server.start()  # a new, empty Redis on the same port
        if cluster:
            wait_cluster_ok(server)  # the node rejoins its own cluster from nodes.conf
        assert a.exists([k]) == [False]
        assert a.stats()["healthy"] is True and a.stats()["last_error"] is not None
        a.put(k, data)
        assert a.get_into(k, out) and out == data
    finally:
        a.close()
        server.stop()


def test_redis_unreachable_at_start_is_not_fatal() -> None:
    a = make_adapter({"type": "redis", "url": f"redis://127.0.0.1:{free_port()}", "timeout_s": 0.5})
    assert a.stats()["healthy"] is True  # nothing tried yet
    with pytest.raises(L2Error, match=r"Connection refused|Error 111"):
        a.exists([key(1)])
    a.close()


def test_redis_reads_objects_written_with_another_part_size(redis_server: RedisServer) -> None:
    url, prefix = f"redis://127.0.0.1:{redis_server.port}", f"p{uuid.uuid4().hex[:6]}:"
    small = RedisL2(url, part_mb=1, key_prefix=prefix)
    big = RedisL2(url, part_mb=8, key_prefix=prefix)
    data = blob(3 * MiB + 7)
    small.put(key(1), data)
    out = bytearray(len(data))
    assert big.get_into(key(1), memoryview(out)) and out == data
    big.put(key(1), data)  # now one part: the old parts 1..3 go
    assert small.get_into(key(1), memoryview(out)) and out == data
    assert big.clear() == 1
    small.close()
    big.close()


def test_redis_cluster_keeps_an_object_in_one_slot(redis_cluster: RedisServer) -> None:
    a = RedisL2(f"redis+cluster://127.0.0.1:{redis_cluster.port}", part_mb=1)
    k = key(1)
    a.put(k, blob(3 * MiB))
    client = redis_cluster.client()
    names = [f"lmcache:{{{k.hex()}}}:{s}" for s in ("m", "0", "1", "2")]
    slots = {client.execute_command("CLUSTER", "KEYSLOT", n) for n in names}
    assert len(slots) == 1 and client.exists(*names) == 4
    assert a.clear() == 1
    client.close()
    a.close()


@pytest.mark.parametrize(
    ("url", "name", "cluster"),
    [
        ("redis://user:pw@h:1/2", "redis://h:1/2", False),
        ("rediss://h", "rediss://h:6379/0", False),
        ("valkey://[::1]:7000", "valkey://[::1]:7000/0", False),
        ("VALKEYS://h:7000/0?password=zzz", "valkeys://h:7000/0", False),
        ("redis+cluster://:pw@h:7000", "redis+cluster://h:7000/0", True),
        (
            "redis+cluster://:pw@h:7000,[::1]:7001,g",
            "redis+cluster://h:7000,[::1]:7001,g:6379/0",
            True,
        ),
    ],
)
def test_redis_url_names_carry_no_credentials(url: str, name: str, cluster: bool) -> None:
    a = RedisL2(url)
    assert (a.name, a.cluster) == (name, cluster)
    assert "pw" not in repr(a) and "zzz" not in str(a.stats())
