"""What each L2 adapter does beyond the contract of test_l2_contract.py: the fs adapter's
restarts (an index rebuilt from the listing alone, torn and temp files dropped, LRU order
from mtimes) and I/O errors, the configs `make_adapter` refuses and builds, and Redis's
credentials (never shown), failures (dead or stalled: fast errors, then recovery),
part sizes, cluster slots and URL names. Real redis-servers, as in `tests.l2_backends`.
"""

from __future__ import annotations

import builtins
import os
import signal
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lmcache.errors import ConfigError
from lmcache.processes import free_port
from lmcache.storage.l2 import make_adapter
from lmcache.storage.l2.base import GiB, L2Error
from lmcache.storage.l2.format import HEADER_SIZE
from lmcache.storage.l2.fs import FsL2
from lmcache.storage.l2.memory import MemoryL2
from lmcache.storage.l2.redis import RedisL2

from .l2_backends import (
    MiB,
    RedisServer,
    blob,
    capacity_gb,
    key,
    need_redis,
    redis_cluster,
    redis_server,
    start_cluster_node,
    wait_cluster_ok,
)

__all__ = ["redis_cluster", "redis_server"]


# ----- fs: restarts --------------------------------------------------------------------------


def test_fs_restart_rebuilds_index_from_listing_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = FsL2(tmp_path)
    keys = [key(i) for i in range(1000)]
    for i, k in enumerate(keys):
        first.put(k, blob(64, seed=i))
    first.close()

    # Only opens of paths under the store count: other threads of this process (the
    # conftest's /dev/shm watcher reads /proc) must keep working while the patch holds.
    real_open, real_os_open = builtins.open, os.open

    def guarded(real: Callable[..., Any]) -> Callable[..., Any]:
        def call(path: object, *args: object, **kwargs: object) -> Any:
            if isinstance(path, (str, os.PathLike)) and Path(path).is_relative_to(tmp_path):
                raise AssertionError("the index rebuild must not open or read object files")
            return real(path, *args, **kwargs)

        return call

    with monkeypatch.context() as m:
        m.setattr(os, "open", guarded(real_os_open))
        m.setattr("builtins.open", guarded(real_open))
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
