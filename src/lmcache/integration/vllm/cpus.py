"""The CPUs that vLLM's forward pass leaves free, for the connector's layered-load copies.

vLLM's CPU backend binds each worker process to the CPUs of its forward pass (one OpenMP
thread per CPU) and keeps the others free for everything else: the engine core, the API
server and, in vLLM's own words, KV connectors. A thread that the worker starts inherits
the worker's binding, so without help the layered-load thread would copy on the CPU of the
forward pass it is meant to run beside::

    engine core (not bound: all of vLLM's CPUs)      {0, 1, 2, 3}
      ├── worker rank 0 (bound)                      {0}
      └── worker rank 1 (bound)                      {1}
    spare = engine core's - every worker's           {2, 3}   <- the layered-load thread

Empty when the workers are not bound (``VLLM_CPU_OMP_THREADS_BIND=nobind``, vLLM on a
GPU) or nothing is left: the thread then stays where it was. (The store thread stays
beside the forward pass: see `store_queue.py`.)
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

logger = logging.getLogger("lmcache.integration")


def spare_cpus() -> frozenset[int]:
    """CPUs that this process's parent may use and none of its children (this process and
    its siblings: vLLM's workers) is bound to; empty if it cannot tell."""
    mine = _affinity(os.getpid())
    parent = _affinity(os.getppid())
    if not mine or not parent or mine == parent:
        return frozenset()  # not bound, or we cannot see our parent
    busy = set(mine)
    for pid in _children(os.getppid()):
        cpus = _affinity(pid)
        if cpus and cpus != parent:  # a bound sibling (an unbound helper process is not)
            busy |= cpus
    return frozenset(parent - busy)


def pin_this_thread(cpus: frozenset[int]) -> bool:
    """Move the calling thread (only it: Linux affinity is per thread) to ``cpus``."""
    if not cpus:
        return False
    try:
        os.sched_setaffinity(0, cpus)
    except OSError:
        return False
    return True


def move_to_spare_cpus(what: str) -> None:
    """Move the calling thread to `spare_cpus` (if there are any), and say where."""
    forward = sorted(_affinity(os.getpid()))
    spare = spare_cpus()
    if pin_this_thread(spare):
        logger.info(
            "%s run on CPUs %s, which vLLM keeps free of its forward pass (on %s)",
            what, _ranges(spare), _ranges(forward),
        )  # fmt: skip


def _ranges(cpus: frozenset[int] | list[int]) -> str:
    """``0-3,8``: the form of taskset and /proc/<pid>/status."""
    runs: list[list[int]] = []  # [first, last] of each run of consecutive CPUs
    for cpu in sorted(cpus):
        if runs and runs[-1][1] == cpu - 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _affinity(pid: int) -> frozenset[int]:
    try:
        return frozenset(os.sched_getaffinity(pid))
    except OSError:
        return frozenset()


def _children(pid: int) -> set[int]:
    """The children of ``pid``, from /proc (each thread's list, where the kernel has it)."""
    found: set[int] = set()
    tasks = Path(f"/proc/{pid}/task")
    with contextlib.suppress(OSError):
        for task in tasks.iterdir():
            with contextlib.suppress(OSError, ValueError):
                found.update(int(c) for c in (task / "children").read_text().split())
    if found:
        return found
    for entry in Path("/proc").iterdir():  # no `children` files: scan for the parent pid
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = (entry / "stat").read_text()
                if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
                    found.add(int(entry.name))
    return found
