"""Start-up and shut-down failures: taken ports, too little memory, signals during
start-up, bad settings, and HTTP clients that hold connections open."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from lmcache.client import LMCacheClient
from lmcache.http.limits import http_connection_limit
from lmcache.processes import free_port
from lmcache.server.runtime import ServerRuntime, StartAborted
from lmcache.settings import ServerSettings

from .conftest import ServerProcess, start_server

GIB = 1 << 30
RUNNING = "LMCache cache server is running..."
STOPPED = "LMCache cache server stopped"


def pool_path(pid: int) -> str:
    return f"/dev/shm/lmcache_l1_pool_{pid}"


def assert_nothing_left(server: ServerProcess) -> None:
    assert not os.path.exists(pool_path(server.proc.pid)), server.log()
    assert not os.path.exists(f"/dev/shm/lmcache_zmq_{server.port}.sock"), server.log()


def assert_never_running_after_stop(log: str) -> None:
    if RUNNING in log and STOPPED in log:
        assert log.index(RUNNING) < log.index(STOPPED), log


def test_taken_http_port_exits_1_at_once_and_allocates_nothing() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        s = start_server("--http-port", str(port), wait=False)
        assert s.proc.wait(timeout=5) == 1, s.log()
        took = time.monotonic() - started
    log = s.log()
    assert f"cannot bind HTTP on 127.0.0.1:{port}: address already in use (use --http-port)" in log
    assert "torch_dev=" not in log and "Traceback" not in log
    assert_nothing_left(s)
    assert took < 5


def test_failed_start_is_never_announced() -> None:
    # A pool larger than /dev/shm starts lazily; one that must have that much memory at
    # start (--l1-init-size-gb) cannot.
    too_big = f"{shutil.disk_usage('/dev/shm').free * 2 / GIB + 1:.0f}"
    s = start_server("--l1-size-gb", too_big, "--l1-init-size-gb", too_big, wait=False)
    assert s.proc.wait(timeout=30) == 1, s.log()
    log = s.log()
    assert "failed to start: cannot allocate" in log
    for line in ("Application startup complete", "Uvicorn running", "HTTP frontend on", RUNNING):
        assert line not in log, log
    assert "Traceback" not in log
    assert_nothing_left(s)


def _startup_pool_gb() -> float:
    """A pool that takes a moment to pre-fault (2 GiB), smaller where /dev/shm is small."""
    return min(2.0, shutil.disk_usage("/dev/shm").free / GIB / 4)


@pytest.mark.parametrize(
    ("after", "delay"),
    [
        ("spawn", 0.0),
        ("spawn", 0.05),
        ("spawn", 0.2),
        ("spawn", 0.6),
        ("spawn", 1.0),
        ("start", 0.0),  # "start": once the runtime began (pool not yet allocated)
        ("start", 0.1),
        ("start", 0.3),
        ("start", 0.8),
    ],
)
def test_sigterm_during_startup_frees_everything(after: str, delay: float) -> None:
    s = start_server("--l1-size-gb", f"{_startup_pool_gb():.3f}", wait=False)
    if after == "start":
        s.wait_log("torch_dev=", timeout=30)
    time.sleep(delay)
    s.proc.send_signal(signal.SIGTERM)
    rc = s.proc.wait(timeout=60)  # never a hang
    log = s.log()
    if rc == -signal.SIGTERM:  # killed before the server installed its handlers
        assert after == "spawn" and "LMCache" not in log, log
    else:
        assert rc == 0, log
        assert STOPPED in log
    assert "Traceback" not in log
    assert_never_running_after_stop(log)
    assert_nothing_left(s)


def test_stop_races_start_in_process() -> None:
    """ServerRuntime.stop() at any point of start(): start aborts or completes, stop frees
    it all, and nothing is announced after the stop began."""
    for delay in (0.0, 0.02, 0.1, 0.3, None):  # None: stop before start
        runtime = ServerRuntime(ServerSettings(l1_size_gb=0.5, port=free_port()))
        outcome: list[BaseException | None] = []

        def start(
            runtime: ServerRuntime = runtime, outcome: list[BaseException | None] = outcome
        ) -> None:
            try:
                runtime.start()
                outcome.append(None)
            except BaseException as exc:
                outcome.append(exc)

        starter = threading.Thread(target=start)
        if delay is None:
            runtime.stop()
            starter.start()
        else:
            starter.start()
            time.sleep(delay)
            runtime.stop()
        starter.join(timeout=30)
        assert not starter.is_alive()
        assert outcome[0] is None or isinstance(outcome[0], StartAborted), outcome
        assert not runtime.announce(RUNNING)
        assert not runtime.ready
        assert not os.path.exists(pool_path(os.getpid()))
        runtime.stop()  # idempotent


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--l1-size-gb", "inf"], {}, "--l1-size-gb: must be a finite number"),
        (["--l1-size-gb", "nan"], {}, "--l1-size-gb: must be a finite number"),
        (["--l1-size-gb", "0.0000001"], {}, "--l1-size-gb: must be at least 0.000061 (64 KiB)"),
        ([], {"LMCACHE_L1_SIZE_GB": "inf"}, "LMCACHE_L1_SIZE_GB: must be a finite number"),
        ([], {"LMCACHE_L2_ADAPTER": "[{bad"}, "LMCACHE_L2_ADAPTER: not valid JSON"),
        ([], {"LMCACHE_L2_ADAPTER": '{"type": "fs"}'}, "LMCACHE_L2_ADAPTER: must be a JSON list"),
        (["--http-max-connections", "0"], {}, "--http-max-connections: Input should be greater"),
    ],
)
def test_bad_settings_exit_2_with_one_line(
    args: list[str], env: dict[str, str], message: str
) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "lmcache.cli", "server", *args],
        capture_output=True, text=True, timeout=60, env={**os.environ, **env}, check=False,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith(f"lmcache: invalid settings: {message}"), out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.splitlines()) == 1


def test_http_connection_limit_keeps_half_the_descriptors(caplog: pytest.LogCaptureFixture) -> None:
    server_logger = logging.getLogger("lmcache.server")  # "lmcache" may not propagate
    server_logger.addHandler(caplog.handler)
    try:
        assert http_connection_limit(256, 20_000) == 256
        assert http_connection_limit(256, 1024) == 256
        assert not caplog.records
        assert http_connection_limit(256, 800) == 144  # (800 - 512) / 2
        assert "--http-max-connections 256 lowered to 144" in caplog.text
    finally:
        server_logger.removeHandler(caplog.handler)


def _half_open(port: int, n: int) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(b"GET /healthcheck HTTP/1.1\r\nHost: x\r\n")  # never finished
        socks.append(sock)
    return socks


def _closed_by_server(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def test_half_open_http_connections_starve_nothing() -> None:
    s = start_server("--log-level", "DEBUG")
    socks: list[socket.socket] = []
    try:
        assert "file descriptors: soft limit" in s.log()
        socks = _half_open(s.http_port, 600)
        time.sleep(0.5)
        started = time.monotonic()
        health = httpx.get(f"{s.url}/healthcheck", timeout=2)
        assert health.status_code == 200 and time.monotonic() - started < 2
        client = LMCacheClient.connect("localhost", s.port, timeout=2)
        try:
            assert client.ping().server_token
        finally:
            client.close()
        # The longest-waiting ones were closed to admit new ones: descriptors stay bounded.
        closed: set[int] = set()
        deadline = time.monotonic() + 5
        while len(closed) < 600 - 256 and time.monotonic() < deadline:
            closed |= {i for i, sock in enumerate(socks) if _closed_by_server(sock)}
            time.sleep(0.05)
        assert len(closed) >= 600 - 256
        assert len(os.listdir(f"/proc/{s.proc.pid}/fd")) < 256 + 128
        assert "closed 1 idle or half-open ones" in s.log()
    finally:
        for sock in socks:
            sock.close()
        assert s.stop() == 0
    assert_nothing_left(s)


def test_http_header_timeout_and_size() -> None:
    s = start_server("--http-header-timeout-s", "1")
    try:
        (slow,) = _half_open(s.http_port, 1)
        opened = time.monotonic()
        huge = socket.create_connection(("127.0.0.1", s.http_port), timeout=5)
        with contextlib.suppress(OSError):  # the server may close before all is sent
            huge.sendall(b"GET /healthcheck HTTP/1.1\r\nX-Filler: " + b"a" * 100_000)
        with slow, huge, httpx.Client(base_url=s.url, timeout=5) as http:
            huge.settimeout(5)
            with contextlib.suppress(ConnectionResetError):  # closed with data unread: RST
                assert huge.recv(1) == b""  # over 64 KiB of headers: closed at once
            assert time.monotonic() - opened < 0.9
            slow.settimeout(5)
            assert slow.recv(1) == b""  # no complete request within 1 s: closed
            assert 0.9 < time.monotonic() - opened < 4
            # Keep-alive clients are unaffected: quick requests reuse the connection, and
            # after a pause past the timeout the client reconnects by itself.
            for pause in (0.0, 0.1, 1.5):
                time.sleep(pause)
                assert http.get("/healthcheck").status_code == 200
    finally:
        assert s.stop() == 0
