"""What limits Redis write-behind on this machine: the adapter's puts into a real, growing
redis-server under several client and server settings, side by side (issue 12 item 7).

    PYTHONPATH=src python benchmarks/redis_write_behind.py [--variants base thp ...]
        [--rounds 2] [--reps 2] [--objects 16] [--object-mib 40]

Each run starts a fresh redis-server (`lmcache.processes.RedisProcess`, as the tests and
`lmcache bench` do), puts one object to warm up, then times ``--reps`` stores of
``--objects`` fresh objects (40 MiB = one Qwen3-14B 256-token chunk) through `RedisL2.put`
from one anonymous buffer (as the writer sends from L1). Redis grows by every store, as
in the bench's write-behind row. Variants run in ABBA order (``--rounds``), medians last.

Per store: GB/s; redis-server's CPU-seconds per GB and minor page faults per GB (from
/proc/<pid>/stat); this process' CPU-seconds per GB (the client: checksum + the kernel's
copy into the socket). Per round, the ceiling that explains the rest: numpy writing a
fresh anonymous mapping (first touch: fault + clear of every page) vs writing it again.

Variants (everything not named is the `base` setting):
    base       redis-server defaults, TCP loopback, parts of 4 MiB, one connection
    thp        --disable-thp no + MALLOC_CONF=thp:always (Debian's redis-server links the
               system jemalloc, which reads MALLOC_CONF): 2 MiB pages, ~500x fewer faults
    unix       a unix-domain socket instead of TCP loopback
    writers2   two connections, each putting half the objects (as --l2-writers 2)
    part4m64   parts of 4 MiB - 64 B: each fits jemalloc's 4 MiB size class in Redis
    part16     parts of 16 MiB (fewer, larger values)
    sndbuf     SO_SNDBUF 8 MiB on the client's socket
    full       maxmemory = what the warm-up left, allkeys-lru: every part evicts an old
               one, so redis-server reuses memory instead of touching fresh pages
"""

from __future__ import annotations

import argparse
import mmap
import os
import shutil
import socket
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import redis
from redis.connection import UnixDomainSocketConnection

from lmcache.processes import RedisProcess
from lmcache.storage.l2.redis import RedisL2
from lmcache.storage.l2.redis_conn import _PACKER

MiB = 1 << 20
TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Variant:
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    part: int = 4 * MiB
    writers: int = 1
    unix: bool = False
    sndbuf: int = 0
    full: bool = False


VARIANTS = {
    "base": Variant(),
    "thp": Variant(args=("--disable-thp", "no"), env={"MALLOC_CONF": "thp:always"}),
    "unix": Variant(unix=True),
    "writers2": Variant(writers=2),
    "part4m64": Variant(part=4 * MiB - 64),
    "part16": Variant(part=16 * MiB),
    "sndbuf": Variant(sndbuf=8 * MiB),
    "full": Variant(full=True),
}


class PackingUnixConnection(UnixDomainSocketConnection):
    """The adapter's packer (memoryviews sent without a copy) over a unix socket."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(command_packer=_PACKER, **kwargs)


def proc_stat(pid: int) -> tuple[int, float]:
    """(minor faults, CPU-seconds) of process ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[7]), (int(fields[11]) + int(fields[12])) / TICK


def first_touch(nbytes: int) -> tuple[float, float]:
    """GB/s writing a fresh anonymous mapping, then writing it again."""
    m = mmap.mmap(-1, nbytes)
    a = np.frombuffer(m, dtype=np.uint8)
    t0 = time.perf_counter()
    a.fill(1)
    t1 = time.perf_counter()
    a.fill(2)
    t2 = time.perf_counter()
    del a
    m.close()
    return nbytes / (t1 - t0) / 1e9, nbytes / (t2 - t1) / 1e9


def adapters(v: Variant, server: RedisProcess, sock_path: str) -> list[RedisL2]:
    out = []
    for _ in range(v.writers):
        a = RedisL2(server.url, timeout_s=60)
        a.part_size = v.part
        if v.unix:
            pool = redis.ConnectionPool(
                connection_class=PackingUnixConnection, path=sock_path, socket_timeout=60
            )
            a._client = redis.Redis(connection_pool=pool)
        out.append(a)
    return out


def run(name: str, src: memoryview, objects: int, obj: int, reps: int) -> list[dict[str, float]]:
    v = VARIANTS[name]
    tmp = tempfile.mkdtemp(prefix="lmcache-rwb-")
    sock_path = os.path.join(tmp, "redis.sock")
    args = (*v.args, "--unixsocket", sock_path, "--unixsocketperm", "700") if v.unix else v.args
    server = RedisProcess.start(args=args, env=v.env)
    pid, results = server.proc.pid, []
    try:
        ads = adapters(v, server, sock_path)
        # warm-up: connects, first allocations; for `full`, a whole store to evict later
        for i in range(objects if v.full else 1):
            ads[0].put(os.urandom(48), src[i * obj : (i + 1) * obj])
        admin = redis.Redis.from_url(server.url)
        if v.full:
            used = int(admin.info("memory")["used_memory"])
            admin.config_set("maxmemory-policy", "allkeys-lru")
            admin.config_set("maxmemory", str(used))
        for a in ads:
            if v.sndbuf:
                pool = a._connect().connection_pool
                conn = pool.get_connection()
                conn._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, v.sndbuf)
                pool.release(conn)
        for _ in range(reps):
            keys = [os.urandom(48) for _ in range(objects)]

            errors: list[BaseException] = []

            def work(
                w: int, keys: list[bytes] = keys, errors: list[BaseException] = errors
            ) -> None:
                try:
                    for i in range(w, objects, v.writers):
                        ads[w].put(keys[i], src[i * obj : (i + 1) * obj])
                except BaseException as exc:
                    errors.append(exc)

            threads = [threading.Thread(target=work, args=(w,)) for w in range(v.writers)]
            f0, c0 = proc_stat(pid)
            t0, cpu0 = time.perf_counter(), time.process_time()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            dt, cpu = time.perf_counter() - t0, time.process_time() - cpu0
            f1, c1 = proc_stat(pid)
            if errors:
                raise errors[0]
            gb = objects * obj / 1e9
            results.append(
                {"gbs": gb / dt, "srv": (c1 - c0) / gb, "cli": cpu / gb, "flt": (f1 - f0) / gb}
            )
        mem = admin.info("memory")
        if not v.full:  # (a full Redis has evicted an unknown share of what was put)
            stored = (reps * objects + 1) * obj
            results[-1]["used_per_stored"] = mem["used_memory"] / stored
            results[-1]["rss_per_stored"] = mem["used_memory_rss"] / stored
        admin.close()
        for a in ads:
            a.close()
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--objects", type=int, default=16)
    ap.add_argument("--object-mib", type=int, default=40)
    opts = ap.parse_args()
    obj = opts.object_mib * MiB
    buf = mmap.mmap(-1, opts.objects * obj)
    arr = np.frombuffer(buf, dtype=np.uint8)
    arr[:] = np.random.default_rng(1).integers(0, 256, size=arr.size, dtype=np.uint8)
    src = memoryview(buf)
    print(f"redis-server: {os.popen('redis-server --version').read().strip()}")
    thp = Path("/sys/kernel/mm/transparent_hugepage")
    print(f"THP: {(thp / 'enabled').read_text().strip()}, "
          f"defrag {(thp / 'defrag').read_text().strip()}")  # fmt: skip
    res: dict[str, list[dict[str, float]]] = {n: [] for n in opts.variants}
    touch: list[tuple[float, float]] = []
    for r in range(opts.rounds):
        touch.append(first_touch(1 << 30))
        print(f"round {r}: fresh memory first write {touch[-1][0]:.2f} GB/s, "
              f"rewrite {touch[-1][1]:.2f} GB/s")  # fmt: skip
        for name in opts.variants if r % 2 == 0 else opts.variants[::-1]:
            out = run(name, src, opts.objects, obj, opts.reps)
            res[name] += out
            runs = "  ".join(
                f"{x['gbs']:.2f} GB/s (srv {x['srv']:.2f}, cli {x['cli']:.2f} s/GB, "
                f"{x['flt'] / 1e3:.0f}k faults/GB)" for x in out
            )  # fmt: skip
            print(f"  {name:9s} {runs}  load {os.getloadavg()[0]:.1f}", flush=True)
    print(
        "\nmedians    GB/s   redis-server s/GB  client s/GB  faults/GB  used_memory, rss / stored"
    )
    for name, xs in res.items():

        def med(k: str, xs: list[dict[str, float]] = xs) -> float:
            return statistics.median([x[k] for x in xs if k in x] or [float("nan")])

        used, rss = med("used_per_stored"), med("rss_per_stored")
        print(f"{name:9s} {med('gbs'):6.3f}   {med('srv'):10.2f}      {med('cli'):9.2f}"
              f"   {med('flt') / 1e3:7.0f}k   {used:8.3f} {rss:6.3f}")  # fmt: skip
    print(f"fresh memory first write {statistics.median(t[0] for t in touch):.2f} GB/s, "
          f"rewrite {statistics.median(t[1] for t in touch):.2f} GB/s (numpy, 1 GiB)")  # fmt: skip


if __name__ == "__main__":
    main()
