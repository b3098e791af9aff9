"""What limits Redis write-behind (and prefetch) on this machine: the adapter's puts into a
real, growing redis-server, and the reads of what was just put, under several client and
server settings, side by side (issue 12 item 7).

    PYTHONPATH=src python benchmarks/redis_write_behind.py [--variants base thp ...]
        [--rounds 2] [--reps 2] [--objects 16] [--object-mib 40]

Each run starts a fresh redis-server (`lmcache.processes.RedisProcess`, as the tests and
`lmcache bench` do), puts one object to warm up, then ``--reps`` times: puts ``--objects``
fresh objects (40 MiB = one Qwen3-14B 256-token chunk) through `RedisL2.put` from one
anonymous buffer (as the writer sends from L1), and reads them back with
`RedisL2.get_into` into a shared mapping (as prefetch fills L1). Redis grows by every
store, as in the bench's write-behind row. Variants run in ABBA order (``--rounds``),
medians last.

Per put and per read: GB/s; redis-server's CPU-seconds and minor page faults per GB
(from /proc/<pid>/stat); for puts also this process' CPU-seconds per GB (the client:
checksum + the kernel's copy into the socket). Per round, the ceiling that explains the
rest: numpy writing a fresh anonymous mapping (first touch: fault + clear of every page)
vs writing it again.

Variants (everything not named is the `base` setting):
    base       redis-server and jemalloc defaults, TCP loopback, parts of 4 MiB, one
               connection
    thp        --disable-thp no + MALLOC_CONF=thp:always (Debian's redis-server links the
               system jemalloc, which reads MALLOC_CONF): 2 MiB pages, ~500x fewer faults
    unix       a unix-domain socket instead of TCP loopback
    writers2   two connections, each putting half the objects (as --l2-writers 2)
    part4m64   parts of 4 MiB - 64 B: each fits jemalloc's 4 MiB size class in Redis
    part16     parts of 16 MiB (fewer, larger values)
    sndbuf     SO_SNDBUF 8 MiB on the client's socket
    nodecay    MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1: jemalloc keeps the pages
               it frees (GET reply buffers) for reuse instead of handing them back; what
               we recommend and `RedisProcess` (so `lmcache bench`) uses (`REDIS_ENV`)
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

from lmcache.processes import REDIS_ENV, RedisProcess
from lmcache.storage.l2.redis import RedisL2
from lmcache.storage.l2.redis_conn import _PACKER
from lmcache.types import ObjectKey

MiB = 1 << 20
TICK = os.sysconf("SC_CLK_TCK")


STOCK = {"MALLOC_CONF": "", "JE_MALLOC_CONF": ""}  # jemalloc's defaults, not REDIS_ENV's


@dataclass(frozen=True)
class Variant:
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=lambda: STOCK)
    part: int = 4 * MiB
    writers: int = 1
    unix: bool = False
    sndbuf: int = 0
    full: bool = False


VARIANTS = {
    "base": Variant(),
    "thp": Variant(args=("--disable-thp", "no"), env={**STOCK, "MALLOC_CONF": "thp:always"}),
    "unix": Variant(unix=True),
    "writers2": Variant(writers=2),
    "part4m64": Variant(part=4 * MiB - 64),
    "part16": Variant(part=16 * MiB),
    "sndbuf": Variant(sndbuf=8 * MiB),
    "nodecay": Variant(env=REDIS_ENV),
    "full": Variant(full=True),
}


class PackingUnixConnection(UnixDomainSocketConnection):
    """The adapter's packer (memoryviews sent without a copy) over a unix socket."""

    def __init__(self, **kwargs: Any) -> None:
        # redis-py leaves this __init__ unannotated (`untyped_calls_exclude` misses super())
        super().__init__(command_packer=_PACKER, **kwargs)  # type: ignore[no-untyped-call]


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


@dataclass(frozen=True)
class Load:
    """What every run puts: ``objects`` objects of ``obj`` bytes from ``src`` (anonymous
    memory, like the L1 the writer sends from), read back into ``out`` (shared, like L1)."""

    src: memoryview
    out: memoryview
    objects: int
    obj: int
    reps: int

    def part(self, buf: memoryview, i: int) -> memoryview:
        return buf[i * self.obj : (i + 1) * self.obj]


def put_all(v: Variant, ads: list[RedisL2], load: Load, keys: list[ObjectKey]) -> None:
    """``keys[i]`` <- object i, spread over ``v.writers`` threads (one adapter each)."""
    errors: list[BaseException] = []

    def work(w: int) -> None:
        try:
            for i in range(w, len(keys), v.writers):
                ads[w].put(keys[i], load.part(load.src, i))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(v.writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def one_rep(v: Variant, ads: list[RedisL2], load: Load, pid: int) -> dict[str, float]:
    """Put ``load.objects`` fresh objects, then (not in a full Redis, which may have evicted
    some) read them back; GB/s and redis-server's CPU and faults per GB of each."""
    keys = [ObjectKey(os.urandom(48)) for _ in range(load.objects)]
    gb = load.objects * load.obj / 1e9
    f0, c0 = proc_stat(pid)
    t0, cpu0 = time.perf_counter(), time.process_time()
    put_all(v, ads, load, keys)
    dt, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    f1, c1 = proc_stat(pid)
    row = {"gbs": gb / dt, "srv": (c1 - c0) / gb, "cli": cpu / gb, "flt": (f1 - f0) / gb}
    if not v.full:
        t0 = time.perf_counter()
        for i, key in enumerate(keys):
            if not ads[0].get_into(key, load.part(load.out, i)):
                raise RuntimeError(f"object {i} missing right after its put")
        dt = time.perf_counter() - t0
        f2, c2 = proc_stat(pid)
        row |= {"get": gb / dt, "get_srv": (c2 - c1) / gb, "get_flt": (f2 - f1) / gb}
    return row


def run(name: str, load: Load) -> list[dict[str, float]]:
    v = VARIANTS[name]
    tmp = tempfile.mkdtemp(prefix="lmcache-rwb-")
    sock_path = os.path.join(tmp, "redis.sock")
    args = (*v.args, "--unixsocket", sock_path, "--unixsocketperm", "700") if v.unix else v.args
    server = RedisProcess.start(args=args, env=v.env)
    try:
        ads = adapters(v, server, sock_path)
        # warm-up: connects, first allocations; for `full`, a whole store to evict later
        warm = [ObjectKey(os.urandom(48)) for _ in range(load.objects if v.full else 1)]
        put_all(v, ads, load, warm)
        admin = redis.Redis.from_url(server.url)
        if v.full:
            admin.config_set("maxmemory-policy", "allkeys-lru")
            admin.config_set("maxmemory", str(admin.info("memory")["used_memory"]))
        for a in ads if v.sndbuf else []:
            client = a._connect()
            assert isinstance(client, redis.Redis)  # one server here, never a cluster
            pool = client.connection_pool
            conn = pool.get_connection()
            assert conn._sock is not None  # get_connection connects
            conn._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, v.sndbuf)
            pool.release(conn)
        rows = [one_rep(v, ads, load, server.proc.pid) for _ in range(load.reps)]
        mem = admin.info("memory")
        if not v.full:  # (a full Redis has evicted an unknown share of what was put)
            stored = (load.reps * load.objects + 1) * load.obj
            rows[-1]["used_per_stored"] = mem["used_memory"] / stored
            rows[-1]["rss_per_stored"] = mem["used_memory_rss"] / stored
        admin.close()
        for a in ads:
            a.close()
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


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
    out_buf = mmap.mmap(-1, opts.objects * obj, flags=mmap.MAP_SHARED)  # like L1's shm
    np.frombuffer(out_buf, dtype=np.uint8)[:] = 0
    load = Load(src, memoryview(out_buf), opts.objects, obj, opts.reps)
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
            rows = run(name, load)
            res[name] += rows
            for x in rows:
                get = (
                    f" | get {x['get']:.2f} GB/s (srv {x['get_srv']:.2f} s/GB, "
                    f"{x['get_flt'] / 1e3:.0f}k faults/GB)" if "get" in x else ""
                )  # fmt: skip
                print(f"  {name:9s} put {x['gbs']:.2f} GB/s (srv {x['srv']:.2f}, "
                      f"cli {x['cli']:.2f} s/GB, {x['flt'] / 1e3:.0f}k faults/GB){get}  "
                      f"load {os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip
    print("\nmedians   put GB/s  srv s/GB  cli s/GB  faults/GB | get GB/s  srv s/GB  faults/GB"
          " | used_memory, rss / stored")  # fmt: skip
    for name, xs in res.items():

        def med(k: str, xs: list[dict[str, float]] = xs) -> float:
            return statistics.median([x[k] for x in xs if k in x] or [float("nan")])

        print(f"{name:9s} {med('gbs'):8.3f} {med('srv'):9.2f} {med('cli'):9.2f} "
              f"{med('flt') / 1e3:9.0f}k | {med('get'):8.3f} {med('get_srv'):9.2f} "
              f"{med('get_flt') / 1e3:9.0f}k | {med('used_per_stored'):6.3f} "
              f"{med('rss_per_stored'):6.3f}")  # fmt: skip
    print(f"fresh memory first write {statistics.median(t[0] for t in touch):.2f} GB/s, "
          f"rewrite {statistics.median(t[1] for t in touch):.2f} GB/s (numpy, 1 GiB)")  # fmt: skip


if __name__ == "__main__":
    main()
