"""CPU used by processes outside the benchmark while a phase runs.

On a shared 2-core machine one foreign CPU-bound process on vLLM's worker core doubles
the prefill time (runs here switched between ~300 and ~600 ms for the same 1900-token
prompt mid-phase). Each phase therefore records how many cores others used, so a
contaminated number can be told from a real difference. Foreign CPU = all busy CPU time
(/proc/stat, which also counts processes that start and exit inside the phase) minus the
CPU time of this script and of the process groups it started.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")


def _busy_s() -> float:
    # cpu  user nice system idle iowait irq softirq steal ...
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = sum(fields[:3]) + sum(fields[5:8])
    return busy / _TICK


def _own_s(pgids: set[int]) -> float:
    total = 0
    me = os.getpid()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:  # exited meanwhile
            continue
        # The command name may contain spaces: fields start after its closing ")".
        rest = stat[stat.rindex(")") + 2 :].split()
        pid, pgid = int(entry.name), int(rest[2])
        if pid == me or pgid in pgids:
            total += int(rest[11]) + int(rest[12])  # utime, stime
    return total / _TICK


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
