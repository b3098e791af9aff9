"""A test run must leave nothing of ours in /dev/shm (issue 16: one run left a 1 GiB
``lmcache_kv_*`` segment behind).

Our shared-memory names carry the pid of the process that made them
(``lmcache_kv_<pid>_<idx>``, ``lmcache_l1_pool_<pid>``, tests' ``lmcache_*_<pid>``); the
local ZMQ socket ``lmcache_zmq_<port>.sock`` carries a port instead. At the end of the
session a name counts as left behind when it was not there when the session started and

- a segment: its pid is this pytest process, or a process this session started (its
  descendants are sampled twice a second) that is gone now;
- a socket: nothing listens on it any more, and its port is one that a process of this
  session was started with (``--port N``).

Other users' and other test sessions' names (other helpers run tests beside ours on the
same /dev/shm) are never reported, and nothing is ever unlinked here: the check names
what leaked so it can be fixed where it leaked.
"""

from __future__ import annotations

import itertools
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from lmcache.storage.shm_names import shm_dir
from lmcache.transport.zmq_client import refuses_connections

_PID = re.compile(r"^lmcache_(?:kv_(\d+)_\d+|.*?_(\d+))$")
_SOCKET = re.compile(r"^lmcache_zmq_(\d+)\.sock$")
_SAMPLE_S = 0.5


def owner_pid(name: str) -> int | None:
    """The pid an ``lmcache_*`` segment name carries, or None (not ours, or a socket)."""
    match = _PID.match(name)
    if match is None:
        return None
    return int(match.group(1) or match.group(2))


@dataclass
class ShmWatch:
    """What /dev/shm held at the start, and every pid this session has run since."""

    root: Path = field(default_factory=lambda: Path(shm_dir()))
    before: set[str] = field(default_factory=set)
    pids: set[int] = field(default_factory=set)
    ports: set[int] = field(default_factory=set)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self.before = set(self._names())
        self.pids = {os.getpid()}
        self._thread = threading.Thread(target=self._sample, name="shm-watch", daemon=True)
        self._thread.start()

    def _names(self) -> list[str]:
        try:
            return [n for n in os.listdir(self.root) if n.startswith("lmcache_")]
        except OSError:
            return []

    def _sample(self) -> None:
        while not self._stop.wait(_SAMPLE_S):
            try:
                self._note_children()
            except Exception:  # a test may patch open() or os meanwhile
                # A missed sample only makes the check more lenient (a pid it does not
                # know is never reported); it must never fail the test that ran meanwhile.
                continue

    def _note_children(self) -> None:
        try:
            children = psutil.Process().children(recursive=True)
        except psutil.Error:
            return
        for child in children:
            if child.pid in self.pids:
                continue
            self.pids.add(child.pid)
            try:
                args = child.cmdline()
            except psutil.Error:
                continue
            self.ports.update(
                int(port)
                for flag, port in itertools.pairwise(args)
                if flag == "--port" and port.isdigit()
            )

    def leaks(self) -> list[str]:
        """The names this session left behind (see the module docstring)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._note_children()
        left = []
        for name in sorted(set(self._names()) - self.before):
            path = self.root / name
            try:
                st = path.lstat()
            except OSError:
                continue  # gone meanwhile
            if st.st_uid != os.getuid():
                continue
            socket = _SOCKET.match(name)
            if socket is not None:
                ours = int(socket.group(1)) in self.ports
                if ours and refuses_connections(f"ipc://{path}", timeout=0.2):
                    left.append(f"{path} (socket, nothing listens)")
                continue
            pid = owner_pid(name)
            if pid is None or pid not in self.pids:
                continue
            if pid == os.getpid():
                left.append(f"{path} ({st.st_size:,} bytes, made by the test process)")
            elif not psutil.pid_exists(pid):
                left.append(f"{path} ({st.st_size:,} bytes, its process {pid} is gone)")
        return left
