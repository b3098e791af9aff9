"""`pid_alive`, the test behind forgetting dead engines (`lmcache.server.reaper`), on real
processes: a zombie counts as gone only once none of its threads is left, since until
then they may still run or still hold its files (and so its KV segments' locks)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable

from lmcache.server.registry import pid_alive

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
        assert pid_alive(proc.pid)
        proc.send_signal(signal.SIGSTOP)
        _until(lambda: _status(proc.pid)["State"].startswith("T"))
        assert pid_alive(proc.pid)  # frozen is not dead: it may be continued
    finally:
        proc.kill()
        proc.wait()
