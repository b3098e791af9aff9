"""Shared fixtures: real `lmcache server` processes on free ports, and a synthetic engine."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest

from lmcache.bench.harness import free_port
from lmcache.client import LMCacheClient
from lmcache.engine.shm_kv import ShmKVCache


@dataclass
class ServerProcess:
    proc: subprocess.Popen[bytes]
    port: int
    http_port: int
    log_path: Path
    clients: list[LMCacheClient] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self, timeout: float = 10.0) -> LMCacheClient:
        c = LMCacheClient.connect("localhost", self.port, timeout=timeout)
        self.clients.append(c)
        return c

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=10)

    def wait_log(self, text: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not logged; log:\n{self.log()}")
            time.sleep(0.02)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        for c in self.clients:
            c.close()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def start_server(*args: str, env: dict[str, str] | None = None, wait: bool = True) -> ServerProcess:
    port, http_port = free_port(), free_port()
    log = Path(tempfile.mkstemp(prefix="lmcache-server-", suffix=".log")[1])
    cmd = [
        sys.executable, "-m", "lmcache.cli", "server",
        "--port", str(port), "--http-port", str(http_port), "--http-host", "127.0.0.1",
        "--l1-size-gb", "0.25", *args,
    ]  # fmt: skip
    full_env = {**os.environ, **(env or {})}
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=full_env)
    server = ServerProcess(proc, port, http_port, log)
    if wait:
        deadline = time.monotonic() + 30
        while "LMCache cache server is running..." not in server.log():
            if proc.poll() is not None or time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(f"server did not start:\n{server.log()}")
            time.sleep(0.05)
    return server


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    s = start_server("--lock-ttl-s", "30")
    yield s
    s.stop()


# A small model: 4 layers, K and V planes, 64 blocks of 16 tokens, 1 KiB per plane-block.
CHUNK = 256
BLOCK = 16


@pytest.fixture
def engine() -> Iterator[ShmKVCache]:
    kv = ShmKVCache(num_layers=4, num_blocks=64, block_size=BLOCK, block_bytes=2048, planes=2)
    yield kv
    kv.close()


def fill_random(kv: ShmKVCache, seed: int) -> None:
    rng = np.random.default_rng(seed)
    kv.blocks[...] = rng.integers(0, 256, size=kv.blocks.shape, dtype=np.uint8)


def register(client: LMCacheClient, kv: ShmKVCache, instance_id: int, model: str = "m") -> None:
    client.register(
        instance_id,
        model_name=model,
        world_size=1,
        rank=0,
        dtype="bfloat16",
        layout=kv.layout,
        memory=kv.memory,
    )


_counter = iter(range(10**9))


def unique_tokens(n: int, seed: int | None = None) -> np.ndarray:
    rng = np.random.default_rng(next(_counter) if seed is None else seed)
    return rng.integers(0, 50_000, size=n, dtype=np.uint32)


REDIS_BIN = shutil.which("redis-server")


@dataclass
class RedisProcess:
    proc: subprocess.Popen[bytes]
    port: int

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def start_redis(port: int | None = None) -> RedisProcess:
    """A real redis-server on loopback (no persistence), ready to take commands."""
    if REDIS_BIN is None:
        if os.environ.get("LMCACHE_REQUIRE_REDIS") == "1":
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        pytest.skip("redis-server is not installed")
    port = port or free_port()
    proc = subprocess.Popen(
        [REDIS_BIN, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return RedisProcess(proc, port)
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("redis-server did not start")
        time.sleep(0.05)


def lookup_hit(
    client: LMCacheClient, request_id: str, tokens: object, timeout: float = 10, **model: object
) -> int:
    """Lookup, then poll while the server is still loading from L2."""
    hit = client.lookup(request_id, tokens, **model)  # type: ignore[arg-type]
    deadline = time.monotonic() + timeout
    while hit is None:
        assert time.monotonic() < deadline, "lookup stayed pending"
        time.sleep(0.01)
        hit = client.query_lookup(request_id)
    return hit
