"""L2 adapter throughput for large objects, next to same-run ceilings.

    .venv/bin/python benchmarks/l2_bench.py [--mib 40] [--reps 8] [--json out.json]
                                            [--dirs /dev/shm /tmp] [--no-redis]

For each target it times ``put`` and ``get_into`` of ``--mib`` MiB objects (distinct
keys, random bytes, into a pre-faulted output buffer like the L1 pool) and, interleaved
rep by rep so background load hits both alike, the raw operation underneath:

    fs <dir>     FsL2.put / get_into      vs  open+write+close of a new file / open+readinto
    redis        RedisL2.put / get_into   vs  redis-py SET / GET of the same bytes (one key)

The fs numbers never fsync (neither does FsL2), so they measure the page cache, not the
device. Redis runs as a ``redis-server`` subprocess on a free loopback port. GB/s are
10**9 bytes per second of wall time, median over ``--reps``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from typing import Any

from lmcache.storage.l2.base import L2Adapter
from lmcache.storage.l2.fs import FsL2
from lmcache.types import ObjectKey


def _gbps(nbytes: int, seconds: list[float]) -> float:
    return round(nbytes / statistics.median(seconds) / 1e9, 3)


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench(
    adapter: L2Adapter,
    raw_put: Callable[[int, bytes], object],
    raw_get: Callable[[int, memoryview], object],
    data: bytes,
    reps: int,
) -> dict[str, Any]:
    out = memoryview(bytearray(len(data)))  # pre-faulted, like the L1 pool
    times: dict[str, list[float]] = {"put": [], "get": [], "raw_put": [], "raw_get": []}
    keys = [ObjectKey(os.urandom(48)) for _ in range(reps)]
    for i, key in enumerate([ObjectKey(os.urandom(48)), *keys]):  # first round: warm-up
        t_put = _timed(lambda: adapter.put(key, data))  # noqa: B023
        t_raw_put = _timed(lambda: raw_put(i, data))  # noqa: B023
        t_get = _timed(lambda: adapter.get_into(key, out))  # noqa: B023
        assert out == data, "get_into returned other bytes"
        t_raw_get = _timed(lambda: raw_get(i, out))  # noqa: B023
        if i:
            for name, t in zip(times, (t_put, t_get, t_raw_put, t_raw_get), strict=True):
                times[name].append(t)
    adapter.clear()
    return {f"{name}_gbps": _gbps(len(data), t) for name, t in times.items()}


def bench_fs(directory: str, data: bytes, reps: int) -> dict[str, Any]:
    root = tempfile.mkdtemp(prefix="l2bench-", dir=directory)
    try:
        adapter = FsL2(os.path.join(root, "l2"))
        raw_dir = os.path.join(root, "raw")
        os.makedirs(raw_dir)

        def raw_put(i: int, blob: bytes) -> None:
            with open(os.path.join(raw_dir, str(i)), "wb", buffering=0) as f:
                f.write(blob)

        def raw_get(i: int, out: memoryview) -> None:
            with open(os.path.join(raw_dir, str(i)), "rb", buffering=0) as f:
                f.readinto(out)

        return {"target": f"fs {directory}", **bench(adapter, raw_put, raw_get, data, reps)}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def bench_redis(data: bytes, reps: int) -> dict[str, Any]:
    import redis

    from lmcache.storage.l2.redis import RedisL2

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    server = subprocess.Popen([*argv, "--appendonly", "no"], stdout=subprocess.DEVNULL)
    try:
        raw = redis.Redis(port=port)
        for _ in range(200):
            try:
                raw.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.02)

        def raw_get(i: int, out: memoryview) -> None:
            raw.get("raw")

        adapter = RedisL2(f"redis://127.0.0.1:{port}/0")
        result = bench(adapter, lambda i, blob: raw.set("raw", blob), raw_get, data, reps)
        try:
            import hiredis  # noqa: F401

            parser = "hiredis"
        except ImportError:
            parser = "python"
        return {"target": f"redis loopback ({parser} parser)", **result}
    finally:
        server.kill()
        server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=40)
    parser.add_argument("--reps", type=int, default=8)
    parser.add_argument("--dirs", nargs="*", default=["/dev/shm", tempfile.gettempdir()])
    parser.add_argument("--no-redis", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args()
    data = os.urandom(args.mib << 20)
    rows = [bench_fs(d, data, args.reps) for d in args.dirs]
    if not args.no_redis and shutil.which("redis-server"):
        rows.append(bench_redis(data, args.reps))
    print(f"{args.mib} MiB objects, median of {args.reps}, GB/s (10**9 B/s)")
    print(f"{'target':36} {'put':>7} {'raw put':>8} {'get':>7} {'raw get':>8}")
    for r in rows:
        print(
            f"{r['target']:36} {r['put_gbps']:7.2f} {r['raw_put_gbps']:8.2f} "
            f"{r['get_gbps']:7.2f} {r['raw_get_gbps']:8.2f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
