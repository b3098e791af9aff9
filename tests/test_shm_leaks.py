"""The session's /dev/shm check (`tests/shm_leaks.py`) names what a run left behind and
nothing else. Run against a directory of its own, so nothing real is touched."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from .shm_leaks import ShmWatch, owner_pid


def test_names_carry_their_owner() -> None:
    assert owner_pid("lmcache_kv_4242_7") == 4242
    assert owner_pid("lmcache_l1_pool_31407") == 31407
    assert owner_pid("lmcache_fuzz_unsealed_77") == 77
    assert owner_pid("lmcache_zmq_5555.sock") is None
    assert owner_pid("psm_0f00732b") is None


def test_what_the_session_left_behind_and_what_it_did_not(tmp_path: Path) -> None:
    (tmp_path / "lmcache_kv_1_0").write_bytes(b"x")  # there before the session: ignored
    watch = ShmWatch(root=tmp_path)
    watch.start()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.5)"])
    deadline = time.monotonic() + 5
    while child.pid not in watch.pids:  # the sampler saw it run
        assert time.monotonic() < deadline
        time.sleep(0.1)
    child.wait()
    watch.ports.add(1)  # as if a server of ours had run with --port 1
    (tmp_path / f"lmcache_kv_{child.pid}_0").write_bytes(b"xy")  # its process is gone
    (tmp_path / f"lmcache_probe_{os.getpid()}").write_bytes(b"")  # ours, still here
    (tmp_path / "lmcache_l1_pool_1").write_bytes(b"")  # pid 1: alive, not ours
    (tmp_path / "lmcache_zmq_1.sock").write_bytes(b"")  # not a listening socket
    (tmp_path / "lmcache_zmq_2.sock").write_bytes(b"")  # a port we never started
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:
        live.bind(str(tmp_path / "lmcache_zmq_3.sock"))  # still served: not a leak
        live.listen()
        watch.ports.add(3)
        leaks = watch.leaks()
    assert leaks == [
        f"{tmp_path}/lmcache_kv_{child.pid}_0 (2 bytes, its process {child.pid} is gone)",
        f"{tmp_path}/lmcache_probe_{os.getpid()} (0 bytes, made by the test process)",
        f"{tmp_path}/lmcache_zmq_1.sock (socket, nothing listens)",
    ]
    assert sorted(os.listdir(tmp_path)) == sorted(  # reported, never unlinked
        ["lmcache_kv_1_0", f"lmcache_kv_{child.pid}_0", f"lmcache_probe_{os.getpid()}",
         "lmcache_l1_pool_1", "lmcache_zmq_1.sock", "lmcache_zmq_2.sock", "lmcache_zmq_3.sock"]
    )  # fmt: skip
