"""What every benchmark phase needs beside the processes (`lmcache.processes`):
statistics, CPU accounting and a thread runner."""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

GB = 1e9
VOCAB = 151_000

Worker = tuple[Callable[[], None], Callable[[], None]]  # (one step, close)


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else 0.0


def percentile_us(xs: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q) * 1e6) if xs else 0.0


def spread(xs: Sequence[float]) -> float:
    """(max - min) / median: how noisy a set of repetitions was."""
    m = median(xs)
    return (max(xs) - min(xs)) / m if xs and m else 0.0


def random_tokens(n: int, seed: int) -> bytes:
    """``n`` token ids as little-endian uint32 (the wire format), distinct per seed."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, VOCAB, size=n, dtype=np.uint32).astype("<u4").tobytes()


class CpuAccount:
    """CPU time that processes other than this benchmark (and its children) used meanwhile.

    Call `done` after every child has been waited for.
    """

    def __init__(self) -> None:
        self._busy0, self._steal0 = self._machine()
        self._ours0 = self._ours()
        self._wall0 = time.monotonic()

    @staticmethod
    def _machine() -> tuple[float, float]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        tick = os.sysconf("SC_CLK_TCK")
        user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
        return (user + nice + system + irq + softirq) / tick, steal / tick

    @staticmethod
    def _ours() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def done(self) -> dict[str, float]:
        busy, steal = self._machine()
        wall = time.monotonic() - self._wall0
        ours = self._ours() - self._ours0
        others = max(0.0, busy - self._busy0 - ours)
        return {
            "wall_s": round(wall, 2),
            "ours_cpu_s": round(ours, 2),
            "others_cpu_s": round(others, 2),
            "others_share": round(others / (wall * (os.cpu_count() or 1)), 3),
            "steal_s": round(steal - self._steal0, 2),
        }


def run_threads(workers: list[Worker], seconds: float) -> float:
    """Run each worker's step in a loop on its own thread for ``seconds``; return steps/s."""
    n = len(workers)
    barrier = threading.Barrier(n + 1, timeout=60)
    stop = threading.Event()
    counts = [0] * n
    errors: list[BaseException] = []

    def body(i: int) -> None:
        step, close = workers[i]
        try:
            barrier.wait()
            done = 0
            while not stop.is_set():
                step()
                done += 1
            counts[i] = done
        except BaseException as exc:
            errors.append(exc)
        finally:
            close()

    threads = [threading.Thread(target=body, args=(i,), daemon=True) for i in range(n)]
    for th in threads:
        th.start()
    barrier.wait()
    t0 = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for th in threads:
        th.join(timeout=120)
    elapsed = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} of {n} threads failed; first: {errors[0]!r}")
    return sum(counts) / elapsed


def parallel_seconds(jobs: list[Callable[[], None]]) -> float:
    """Wall time of running every job at once, one thread each (started together)."""
    if len(jobs) == 1:
        t0 = time.perf_counter()
        jobs[0]()
        return time.perf_counter() - t0
    barrier = threading.Barrier(len(jobs) + 1, timeout=60)
    errors: list[BaseException] = []

    def body(job: Callable[[], None]) -> None:
        barrier.wait()
        try:
            job()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(j,), daemon=True) for j in jobs]
    for th in threads:
        th.start()
    barrier.wait()
    t0 = time.perf_counter()
    for th in threads:
        th.join(timeout=600)
    elapsed = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(jobs)} jobs failed; first: {errors[0]!r}")
    return elapsed
