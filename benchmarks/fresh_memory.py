"""How fast this machine hands out memory never touched before, as more of it is in use.

    python benchmarks/fresh_memory.py [--step-gib 2] [--max-gib 16]

Fills anonymous mappings of ``--step-gib`` one after the other with numpy, keeping every
earlier one, and prints the first write's GB/s (the kernel's fault and clear of each
page; on a VM the host's work too) next to a second write of the same mapping. A growing
Redis or page cache pays the first-write price for every byte it stores, whatever the
client does: this is the floor under `lmcache bench`'s "redis: store" row. On the 2-vCPU
VM of benchmarks/results it fell from ~1.3 to ~0.3 GB/s once ~10 GB were in use
(benchmarks/results/redis_write_behind.txt). Stops before ``MemAvailable`` runs short.
"""

from __future__ import annotations

import argparse
import mmap
import time

import numpy as np

GiB = 1 << 30


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def timed_fill(view: np.ndarray, value: int) -> float:
    t0 = time.perf_counter()
    view.fill(value)
    return view.nbytes / (time.perf_counter() - t0) / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--step-gib", type=float, default=2.0)
    p.add_argument("--max-gib", type=float, default=16.0)
    args = p.parse_args()
    step = int(args.step_gib * GiB)
    held: list[mmap.mmap] = []
    try:
        while (len(held) + 1) * step <= args.max_gib * GiB:
            if available_bytes() < step + 2 * GiB:
                print("stopping: less than the next step + 2 GiB available")
                break
            region = mmap.mmap(-1, step)
            view = np.frombuffer(region, dtype=np.uint8)
            first, again = timed_fill(view, 1), timed_fill(view, 2)
            del view
            print(
                f"held {len(held) * step / GiB:5.1f} GiB: first write {first:5.2f} GB/s, "
                f"second {again:5.2f} GB/s",
                flush=True,
            )
            held.append(region)
    finally:
        for region in held:
            region.close()


if __name__ == "__main__":
    main()
