"""Real processes that the tests and `lmcache bench` start: an `lmcache server` and a
`redis-server`, each on free loopback ports, stopped by whoever started them.

One module for both, so that the benchmark drives the server exactly as the tests do
(same command line, same readiness check, same stop), and neither imports the other.

    ServerProcess.start(*flags) ─> `python -m lmcache.cli server --port P --http-port H ...`
                                   ready when the log says "LMCache cache server is running..."
    RedisProcess.start()        ─> `redis-server --port P --save "" --appendonly no [args]`
                                   with REDIS_ENV (jemalloc keeps freed pages); ready when
                                   it answers PING

A Redis Cluster of such processes is `lmcache.cluster_processes.RedisCluster`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

READY_LINE = "LMCache cache server is running..."
_PORT_TAKEN = "Address already in use"
_PORT_ATTEMPTS = 3


_LOWEST_PORT = 10000
_pick = random.SystemRandom()  # not the `random` module's state: xdist workers may share a seed


def _ephemeral_floor() -> int:
    """The first port of the kernel's range for source ports of outgoing connections."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def port_is_free(port: int) -> bool:
    """Whether a loopback TCP socket can bind ``port`` now."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(offsets: Sequence[int] = (0,)) -> int:
    """A loopback TCP port P nobody listens on right now (nor on P + each of ``offsets``:
    a Redis Cluster node's bus port is P + 10000), chosen below the ephemeral range.

    Why not ``bind(0)``: the kernel picks that port from the range it also gives every
    outgoing ``connect()`` its source port from, so between this probe and the process
    that binds it, any connection on the host may take it (CI saw ``Address already in
    use`` so). Below the range, only an explicit bind takes a port; and the pick is random,
    so that parallel test workers rarely probe the same one (`ServerProcess.start` retries
    when they do)."""
    top = _ephemeral_floor() - max(offsets)
    for _ in range(200):
        port = _pick.randrange(_LOWEST_PORT, top) if top - _LOWEST_PORT >= 1000 else 0
        if port == 0:  # an odd ephemeral range: leave the choice to the kernel
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = int(s.getsockname()[1])
        if all(port_is_free(port + offset) for offset in offsets):
            return port
    raise RuntimeError(f"no free loopback port (with offsets {list(offsets)})")


@dataclass
class ServerProcess:
    """A real ``lmcache server`` subprocess on free loopback ports; its output in a file."""

    proc: subprocess.Popen[bytes]
    port: int
    http_port: int
    log_path: Path
    startup_s: float = 0.0

    @classmethod
    def start(
        cls, *flags: str, env: dict[str, str] | None = None, wait: bool = True,
        timeout: float = 120.0,
    ) -> ServerProcess:  # fmt: skip
        """Start a server with ``flags`` (and ``env`` on top of ours); ``wait``: until ready
        (RuntimeError with its log if it exits or is not ready within ``timeout``). A server
        that lost its port to another process before binding it is started again on others."""
        for attempt in range(_PORT_ATTEMPTS):
            t0 = time.perf_counter()
            server = cls._spawn(flags, env)
            if not wait:
                return server
            try:
                server.wait_ready(timeout)
            except RuntimeError:
                if attempt + 1 < _PORT_ATTEMPTS and _PORT_TAKEN in server.log():
                    continue
                raise
            server.startup_s = time.perf_counter() - t0
            return server
        raise AssertionError("unreachable")

    @classmethod
    def _spawn(cls, flags: Sequence[str], env: Mapping[str, str] | None) -> ServerProcess:
        port, http_port = free_port(), free_port()
        fd, name = tempfile.mkstemp(prefix="lmcache-server-", suffix=".log")
        cmd = [
            sys.executable, "-m", "lmcache.cli", "server", "--port", str(port),
            "--http-host", "127.0.0.1", "--http-port", str(http_port), *flags,
        ]  # fmt: skip
        try:
            proc = subprocess.Popen(
                cmd, stdout=fd, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
            )
        finally:
            os.close(fd)
        return cls(proc, port, http_port, Path(name))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, text: str, timeout: float = 10.0, since: int = 0) -> None:
        """Until ``text`` is logged (after the first ``since`` characters of the log)."""
        deadline = time.monotonic() + timeout
        while text not in self.log()[since:]:
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not logged; log:\n{self.log()}")
            time.sleep(0.02)

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while READY_LINE not in self.log():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server did not start:\n{self.log()[-4000:]}")
            time.sleep(0.05)

    def http_json(self, method: str, path: str) -> dict[str, Any]:
        req = urllib.request.Request(self.url + path, method=method)
        with urllib.request.urlopen(req, timeout=30) as resp:
            body: dict[str, Any] = json.loads(resp.read())
        return body

    def status(self) -> dict[str, Any]:
        return self.http_json("GET", "/status")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Send ``sig`` (SIGTERM, as a user would) and return the exit code; killed if it
        does not exit within 30 s."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


REDIS_MALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
"""The jemalloc setting the README recommends for a redis-server that serves as L2: keep the
pages it frees for reuse. Redis copies every GET reply of a multi-MiB part into a fresh
buffer and frees it; with jemalloc's default decay those pages go back to the kernel and the
next reply faults them in again (a first touch of fresh memory: 0.6 s/GB and more on the
2-vCPU VM).
Kept, redis-server's CPU per GB read halves (`benchmarks/results/redis_write_behind.txt`);
the price is that its RSS does not shrink after deletes (``MEMORY PURGE`` releases it)."""

REDIS_ENV = {"MALLOC_CONF": REDIS_MALLOC_CONF, "JE_MALLOC_CONF": REDIS_MALLOC_CONF}
"""Both names: Debian's redis-server links the system jemalloc (reads ``MALLOC_CONF``), one
built from Redis' sources its bundled copy, prefixed ``je_`` (reads ``JE_MALLOC_CONF``)."""


class RedisUnavailable(RuntimeError):
    """There is no redis-server binary on this machine."""


@dataclass
class RedisProcess:
    """A throwaway redis-server on loopback (no persistence), started with `REDIS_ENV`, the
    jemalloc setting we recommend; Redis' own defaults otherwise (no ``maxmemory``)."""

    proc: subprocess.Popen[bytes]
    port: int

    @classmethod
    def start(
        cls, port: int | None = None, timeout: float = 10.0, args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> RedisProcess:  # fmt: skip
        """``args``: more ``--name value`` settings (after ours, so they win); ``env`` on top
        of ours and `REDIS_ENV` (``{"MALLOC_CONF": ""}``: jemalloc's defaults), as
        ``benchmarks/redis_write_behind.py`` compares them."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise RedisUnavailable("redis-server is not installed (apt-get install redis-server)")
        # A port we picked may be taken before redis-server binds it: then it exits at
        # once, and another port is tried (a port the caller named is tried once).
        for _ in range(1 if port else _PORT_ATTEMPTS):
            chosen = port or free_port()
            proc = subprocess.Popen(
                [binary, "--port", str(chosen), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", *args],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                env={**os.environ, **REDIS_ENV, **(env or {})},
            )  # fmt: skip
            redis = cls(proc, chosen)
            if redis._answers_within(timeout):
                return redis
            exited = proc.poll() is not None  # (not: still silent at the deadline)
            redis.stop()
            if not exited:
                break
        raise RuntimeError("redis-server did not start")

    def _answers_within(self, timeout: float) -> bool:
        """Until this redis-server answers PING (False: it exited, or ``timeout`` passed). A
        PONG counts only while it lives: another redis-server may have the port."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            if self.pong():
                return self.proc.poll() is None
            time.sleep(0.05)
        return False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def pong(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
