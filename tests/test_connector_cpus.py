"""Where the connector's store thread runs: on the CPUs vLLM's forward pass leaves free
(`lmcache.integration.vllm.cpus`), found from real processes' affinities as in vLLM's
process tree (an unbound engine core whose workers are bound)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from lmcache.integration.vllm.cpus import _ranges, pin_this_thread

CPUS = sorted(os.sched_getaffinity(0))
needs_two = pytest.mark.skipif(len(CPUS) < 2, reason="needs 2 CPUs")

# The engine core: starts a bound worker (and, with "sibling", a second worker bound to
# another CPU first); the worker prints what it finds spare.
ENGINE_CORE = """
import os, subprocess, sys
cpus = sorted(os.sched_getaffinity(0))
pin = "import os, sys; os.sched_setaffinity(0, {%d}); "
sibling = None
if sys.argv[1] == "sibling":
    code = pin % cpus[1] + "print(1, flush=True); sys.stdin.read()"
    sibling = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    sibling.stdout.readline()
helper = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                          stdin=subprocess.PIPE)  # unbound, like vLLM's helper processes
code = pin % cpus[0] + (
    "from lmcache.integration.vllm.cpus import spare_cpus; print(sorted(spare_cpus()))"
)
print(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                     check=True).stdout.strip())
for p in (sibling, helper):
    if p is not None:
        p.stdin.close()
        p.wait()
"""


def spare_seen_by_a_worker(mode: str) -> list[int]:
    out = subprocess.run(
        [sys.executable, "-c", ENGINE_CORE, mode], capture_output=True, text=True, check=True
    )
    return [int(c) for c in out.stdout.strip().strip("[]").split(",") if c.strip()]


@needs_two
def test_a_bound_worker_finds_the_cpus_its_engine_core_has_and_no_worker_uses() -> None:
    assert spare_seen_by_a_worker("alone") == CPUS[1:]
    assert spare_seen_by_a_worker("sibling") == CPUS[2:]


def test_an_unbound_process_finds_nothing_spare() -> None:
    code = "from lmcache.integration.vllm.cpus import spare_cpus; print(len(spare_cpus()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0"


@needs_two
def test_pinning_moves_only_the_calling_thread() -> None:
    seen: dict[str, str] = {}

    def run() -> None:
        assert pin_this_thread(frozenset({CPUS[-1]}))
        status = Path(f"/proc/self/task/{threading.get_native_id()}/status").read_text()
        seen["thread"] = next(
            line.split()[1] for line in status.splitlines() if line.startswith("Cpus_allowed_list")
        )

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert seen["thread"] == str(CPUS[-1])
    assert sorted(os.sched_getaffinity(0)) == CPUS
    assert not pin_this_thread(frozenset())


def test_cpu_lists_read_like_taskset() -> None:
    assert _ranges([0, 1, 2, 3, 8, 10, 11]) == "0-3,8,10-11"
    assert _ranges(frozenset({5})) == "5"
