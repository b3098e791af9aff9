"""CPU used by processes outside the benchmark while a phase runs.

On a shared 2-core machine one foreign CPU-bound process on vLLM's worker core doubles
the prefill time (runs here switched between ~300 and ~600 ms for the same 1900-token
prompt mid-phase). Each phase therefore records how many cores others used, so a
contaminated number can be told from a real difference. Foreign CPU = all busy CPU time
(/proc/stat, which also counts processes that start and exit inside the phase) minus the
CPU time of this script and of the process groups it started.
"""

from __future__ import annotations

import bisect
import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

_TICK = os.sysconf("SC_CLK_TCK")


def _cpu_ticks() -> list[int]:
    """/proc/stat's first line: all CPUs' user nice system idle iowait irq softirq steal ..."""
    return [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]


def _busy_s() -> float:
    ticks = _cpu_ticks()
    return (sum(ticks[:3]) + sum(ticks[5:8])) / _TICK


def _steal_s() -> float:
    """CPU time the hypervisor gave to other guests (all CPUs): /proc/stat's steal."""
    return _cpu_ticks()[7] / _TICK


def _pids() -> list[int]:
    return [int(entry.name) for entry in os.scandir("/proc") if entry.name.isdigit()]


def _process(pid: int) -> tuple[int, float] | None:
    """(process group, CPU seconds used: utime + stime) of ``pid``; None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may contain spaces: fields start after its closing ")".
    rest = stat[stat.rindex(")") + 2 :].split()
    return int(rest[2]), (int(rest[11]) + int(rest[12])) / _TICK


def _own_s(pgids: set[int]) -> float:
    me = os.getpid()
    total = 0.0
    for pid in _pids():
        process = _process(pid)
        if process is not None and (pid == me or process[0] in pgids):
            total += process[1]
    return total


class CpuMeter:
    """start() ... stop() gives the wall time and the cores used by foreign processes."""

    def __init__(self, pgids: Iterable[int]) -> None:
        self.pgids = set(pgids)
        self._start = (0.0, 0.0, 0.0)

    def start(self) -> None:
        self._start = (time.monotonic(), _busy_s(), _own_s(self.pgids))

    def stop(self) -> dict[str, float]:
        wall = time.monotonic() - self._start[0]
        foreign = (_busy_s() - self._start[1]) - (_own_s(self.pgids) - self._start[2])
        return {"wall_s": wall, "foreign_cores": max(foreign, 0.0) / max(wall, 1e-9)}


def _members(pgids: set[int]) -> list[int]:
    """The processes of ``pgids`` alive now (not this one: the client's work, and the
    sampler's own, are the same whatever the configuration)."""
    return [pid for pid in _pids() if (p := _process(pid)) is not None and p[0] in pgids]


class CpuSampler:
    """The CPU our processes used, each and in all, and the CPU the VM lost to steal, in a
    window known only afterwards (decode: from the last stream's first token to the first
    stream's last).

    A thread samples ``perf_counter()``, each process's CPU seconds and steal every
    ``period`` s; `between` interpolates. Which process takes how much shows where a
    configuration's time goes: vLLM's worker, engine core and API server, our server. The
    processes are listed once, at the start (none starts while streams decode; one that
    exits keeps the CPU it used)."""

    def __init__(self, pgids: Iterable[int], period: float = 0.05) -> None:
        self.pids = _members(set(pgids))
        self.labels = [_label(pid) for pid in self.pids]
        self.period = period
        self._last = np.zeros(len(self.pids))  # each one's CPU seconds, last seen
        self.samples: list[tuple[float, np.ndarray, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            self.samples.append((time.perf_counter(), self._cpu(), _steal_s()))
            if self._stop.wait(self.period):
                self.samples.append((time.perf_counter(), self._cpu(), _steal_s()))
                return

    def _cpu(self) -> np.ndarray:
        for i, pid in enumerate(self.pids):
            process = _process(pid)
            if process is not None:  # (one that exited keeps what it had used)
                self._last[i] = process[1]
        return self._last.copy()

    def between(self, t0: float, t1: float) -> dict[str, Any]:
        """``own_cpu_s``, ``own_cores``, ``steal_cores`` and ``cores_by_process`` (label:
        cores, busiest first) from ``t0`` to ``t1``."""
        (c0, s0), (c1, s1) = self._at(t0), self._at(t1)
        wall = max(t1 - t0, 1e-9)
        used = c1 - c0
        by: dict[str, float] = {}
        for label, cpu in zip(self.labels, used, strict=True):
            by[label] = by.get(label, 0.0) + float(cpu) / wall
        return {
            "own_cpu_s": float(used.sum()),
            "own_cores": float(used.sum()) / wall,
            "steal_cores": (s1 - s0) / wall,
            "cores_by_process": dict(sorted(by.items(), key=lambda kv: -kv[1])),
        }

    def _at(self, t: float) -> tuple[np.ndarray, float]:
        times = [s[0] for s in self.samples]
        i = min(max(bisect.bisect_left(times, t), 1), len(times) - 1)
        (ta, ca, sa), (tb, cb, sb) = self.samples[i - 1], self.samples[i]
        f = min(max((t - ta) / (tb - ta), 0.0), 1.0) if tb > ta else 0.0
        return ca + f * (cb - ca), sa + f * (sb - sa)


def _label(pid: int) -> str:
    """What a process is: its name (vLLM names its engine core and workers), or our
    server's command."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return f"pid {pid}"
    if b"lmcache.cli" in cmdline and b"server" in cmdline:
        return "lmcache server"
    return comm
