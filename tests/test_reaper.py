"""`pid_alive`, the test behind forgetting dead engines (`lmcache.server.reaper`), on real
processes: a zombie counts as gone only once none of its threads is left, since until
then they may still run or still hold its files (and so its KV segments' locks); and how
often the reaper tries again a dead process's segment that is still held."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import cast

import pytest

from lmcache.server import reaper
from lmcache.server.metrics import Metrics
from lmcache.server.registry import EngineRegistry, pid_alive, pid_exiting
from lmcache.server.sessions import Sessions
from lmcache.server.worker_copy import PreparedTransfers
from lmcache.storage.chunk_store import ChunkStore
from lmcache.storage.shm_names import Sweep

# Its main thread ends (pthread_exit) and leaves the kernel's task a zombie, while a second
# thread goes on sleeping: the process is alive.
MAIN_THREAD_EXITS = """
import ctypes, threading, time
threading.Thread(target=time.sleep, args=(120,)).start()
time.sleep(0.1)
ctypes.CDLL(None).pthread_exit(None)
"""


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return {k: v.strip() for k, _, v in (line.partition(":") for line in f)}


def _until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_zombie_main_thread_with_a_live_thread_is_alive() -> None:
    proc = subprocess.Popen([sys.executable, "-c", MAIN_THREAD_EXITS])
    try:
        _until(lambda: _status(proc.pid)["State"].startswith("Z"))
        assert _status(proc.pid)["Threads"] == "2"
        assert pid_alive(proc.pid)
        assert pid_exiting(proc.pid)  # its main thread did
        proc.send_signal(signal.SIGKILL)
        # not waited for: a zombie with no thread left is gone for us
        _until(lambda: _status(proc.pid)["Threads"] == "1")
        assert not pid_alive(proc.pid)
    finally:
        proc.kill()
        proc.wait()
    assert not pid_alive(proc.pid)


def test_stopped_and_running_processes_are_alive() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        assert pid_alive(proc.pid) and not pid_exiting(proc.pid)
        proc.send_signal(signal.SIGSTOP)
        _until(lambda: _status(proc.pid)["State"].startswith("T"))
        assert pid_alive(proc.pid)  # frozen is not dead: it may be continued
    finally:
        proc.kill()
        proc.wait()


class _Clock:
    t = 0.0

    @classmethod
    def monotonic(cls) -> float:
        return cls.t


def test_a_segment_held_for_good_is_tried_less_and_less_often(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A dead process's segment that a living process still holds (a descriptor inherited by
    a child) is tried again at the next reap, then after 2, 4 ... 64 s, not every second."""
    tries: list[float] = []

    def still_held(name: str) -> Sweep:
        tries.append(_Clock.t)
        return "live"

    monkeypatch.setattr(reaper, "unlink_if_stale", still_held)
    monkeypatch.setattr(reaper, "time", _Clock)
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    gone = int(done.stdout)  # waited for: gone
    store = cast(ChunkStore, None)  # nothing here reaches L1
    sessions = Sessions(store, chunk_size=256, ttl=60)
    prepared = PreparedTransfers(store, sessions, cast(Metrics, None), chunk_size=256, ttl=60)
    r = reaper.EngineReaper(EngineRegistry(256), sessions, prepared)
    r._forget_later(gone, ["lmcache_kv_1_0"])  # what a dead engine's held segment leaves
    for second in range(200):
        _Clock.t = float(second)
        assert r.reap(idle_s=0) == []
    assert tries == [0, 1, 3, 7, 15, 31, 63, 127, 191]
