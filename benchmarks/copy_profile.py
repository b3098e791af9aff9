"""Where the block copy stands against np.copyto of the same bytes (issue 12, item 3).

    PYTHONPATH=src python benchmarks/copy_profile.py [--tokens 4096] [--reps 7] [--threads 1 2 4]

qwen3-14b geometry by default (40 layers, 32 KiB planes at block 16), blocks shuffled as a
paged allocator hands them out, chunk buffers in a pre-faulted shared pool: exactly what
`lmcache bench` times as its in-process ceiling. Every variant runs interleaved with
single-threaded np.copyto of the same total bytes, rep by rep; medians are printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import numpy as np

from lmcache.engine.shm_kv import ShmKVCache
from lmcache.engine.transfer import BlockCopier
from lmcache.storage.shm import ShmSegment


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--block", type=int, default=16)
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--sorted", action="store_true", help="adjacent block ids (coalescable)")
    a = p.parse_args()
    blocks, bpc = a.tokens // a.block, a.chunk // a.block
    kv = ShmKVCache(num_layers=40, num_blocks=2 * blocks, block_size=a.block,
                    block_bytes=2 * a.block * 8 * 128 * 2)  # fmt: skip
    kv.segment.array[:] = 1
    ids = np.random.default_rng(1).permutation(2 * blocks)[:blocks].astype(np.int64)
    if a.sorted:
        ids = np.arange(blocks, dtype=np.int64)
    copiers = {t: BlockCopier(kv.layout, [kv.segment.array], bpc, copy_threads=t)
               for t in a.threads}  # fmt: skip
    chunk_bytes = copiers[a.threads[0]].chunk_bytes
    chunks = blocks // bpc
    pool = ShmSegment.create(f"/lmcache_profile_{os.getpid()}", chunks * chunk_bytes)
    bufs = [pool.array[i * chunk_bytes : (i + 1) * chunk_bytes] for i in range(chunks)]
    nbytes = chunks * chunk_bytes
    src, dst = np.ones(nbytes, np.uint8), np.full(nbytes, 2, np.uint8)

    def gather(c: BlockCopier) -> Callable[[], None]:
        return lambda: c.gather_range(ids, enumerate(bufs))

    def scatter(c: BlockCopier) -> Callable[[], None]:
        return lambda: c.scatter_range(ids, bufs)

    jobs: dict[str, Callable[[], None]] = {"np.copyto": lambda: np.copyto(dst, src)}
    for t, c in copiers.items():
        jobs[f"gather  t={t}"] = gather(c)
        jobs[f"scatter t={t}"] = scatter(c)
    times: dict[str, list[float]] = {k: [] for k in jobs}
    for rep in range(a.reps + 1):
        for k, fn in jobs.items():
            t0 = time.perf_counter()
            fn()
            if rep:
                times[k].append(time.perf_counter() - t0)
    base = nbytes / statistics.median(times["np.copyto"]) / 1e9
    print(f"{nbytes / 1e6:.0f} MB per call, {chunks} chunks of {chunk_bytes >> 20} MiB, "
          f"{os.cpu_count()} CPUs")  # fmt: skip
    for k, v in times.items():
        g = nbytes / statistics.median(v) / 1e9
        print(f"{k:<16}{g:8.2f} GB/s  {g / base:5.2f}x np.copyto")
    pool.close()
    pool.unlink()
    kv.close()


if __name__ == "__main__":
    main()
