"""Upstream LMCache command lines against our real server: `lmcache server` with upstream's
flags (mapped, or refused with one line and exit 2), and the operator commands `ping`,
`describe`, `query` and `kvcache clear` with the server up and down."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from lmcache.engine.shm_kv import ShmKVCache
from lmcache.processes import free_port
from lmcache.upstream_flags import UpstreamFlagError, translate

from .conftest import CHUNK, ServerProcess, engine, fill_random, register, start_server

__all__ = ["engine"]  # the fixture, used below


def lmcache(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lmcache.cli", *args], input=stdin, capture_output=True,
        text=True, timeout=60, check=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def upstream_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server started with upstream's flags and adapter shape only."""
    base = tmp_path_factory.mktemp("fs-l2")
    s = start_server(
        "--worker-reap-timeout-seconds", "90", "--l1-read-ttl-seconds", "45",
        "--l1-write-ttl-seconds=45", "--supported-transfer-mode", "auto", "--transport", "zmq",
        "--instance-id", "node-a", "--l2-store-policy", "default", "--hash-algorithm", "blake3",
        "--max-gpu-workers", "2", "--no-l1-use-lazy", "--prometheus-port", str(free_port()),
        "--kv-event-log-size", "32768",
        "--l2-adapter", json.dumps({"type": "fs", "base_path": str(base)}),
    )  # fmt: skip
    s.fs_base = base  # type: ignore[attr-defined]
    yield s
    s.stop()


def test_upstream_flags_take_effect(upstream_server: ServerProcess) -> None:
    config = upstream_server.http_json("GET", "/config")
    assert config["engine_timeout_s"] == 90
    assert config["lock_ttl_s"] == 45
    assert config["hash_algorithm"] == "blake3"
    assert config["instance_id"] == "node-a"
    assert config["max_workers"] == 2
    assert config["l2_store_policy"] == "all"
    assert config["kv_event_log_size"] == 32768
    assert upstream_server.status()["kv_events"]["size"] == 32768
    assert config["l2_adapter"][0]["base_path"]  # as given; the fs adapter gets it as path
    version = upstream_server.http_json("GET", "/version")
    assert version["instance_id"] == "node-a"
    port = config["prometheus_port"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert b"lmcache_l1_capacity_bytes" in resp.read()


def test_commands_against_a_running_server(
    upstream_server: ServerProcess, engine: ShmKVCache, tmp_path: Path
) -> None:
    s = upstream_server
    zmq = ["--port", str(s.port)]
    ping = lmcache("ping", *zmq, "--format", "json")
    assert ping.returncode == 0, ping.stderr
    assert json.loads(ping.stdout)["status"] == "OK"
    assert lmcache("ping", "kvcache", "--url", s.url, "-q").returncode == 0
    described = lmcache("describe", "kvcache", "--url", s.url)
    assert described.returncode == 0 and "L1 capacity gb" in described.stdout
    assert "node-a" in described.stdout

    client = s.client()
    register(client, engine, 301)
    fill_random(engine, 1)
    tokens = np.arange(3 * CHUNK, dtype=np.uint32) + 7
    client.store("up-store", 301, tokens, start=0, end=2 * CHUNK, block_ids=range(32))
    ids = ",".join(map(str, tokens.tolist()))
    query = lmcache("query", "kvcache", *zmq, "--url", s.url, "--tokens", ids, "--format", "json")
    assert query.returncode == 0, query.stderr
    assert json.loads(query.stdout)["cached_tokens"] == 2 * CHUNK
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps(tokens.tolist()))
    by_file = lmcache("query", *zmq, "--url", s.url, "--tokens-file", str(path), "--format", "json")
    assert json.loads(by_file.stdout)["tokens"] == 3 * CHUNK
    by_stdin = lmcache("query", *zmq, "--model", "m", "--dtype", "bfloat16", stdin=ids)
    assert by_stdin.returncode == 0 and "Cached tokens" in by_stdin.stdout

    deadline = time.monotonic() + 20  # the copy to L2 runs behind the store
    while sum(p.is_file() for p in s.fs_base.rglob("*")) < 2:  # type: ignore[attr-defined]
        assert time.monotonic() < deadline, "chunks never reached the fs tier"
        time.sleep(0.05)
    # L1 cleared, the fs tier (upstream's base_path) still has both chunks: a hit from L2.
    cleared = lmcache("kvcache", "clear", "--url", s.url, "--format", "json")
    assert cleared.returncode == 0, cleared.stderr
    assert json.loads(cleared.stdout)["status"] == "OK"
    again = lmcache("query", *zmq, "--url", s.url, "--tokens", ids, "--format", "json")
    assert json.loads(again.stdout)["cached_tokens"] == 2 * CHUNK
    assert lmcache("kvcache", "clear", "--url", s.url, "--tier", "all", "-q").returncode == 0
    gone = lmcache("query", *zmq, "--url", s.url, "--tokens", ids, "--format", "json")
    assert json.loads(gone.stdout)["cached_tokens"] == 0


@pytest.mark.parametrize(
    "args",
    [
        ["ping", "--timeout", "0.5"],
        ["ping", "kvcache", "--url", "http://127.0.0.1:PORT"],
        ["describe", "--url", "http://127.0.0.1:PORT"],
        ["query", "--timeout", "0.5", "--model", "m", "--dtype", "bfloat16", "--tokens", "1,2"],
        ["kvcache", "clear", "--url", "http://127.0.0.1:PORT"],
    ],
)
def test_commands_with_the_server_down(args: list[str]) -> None:
    port = str(free_port())
    args = [a.replace("PORT", port) for a in args]
    if args[0] in ("ping", "query") and "--url" not in args:
        args += ["--port", port]
    result = lmcache(*args)
    assert result.returncode == 1
    assert result.stderr.startswith(f"lmcache {args[0]}: "), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "flags",
    [
        ["--p2p-advertise-url", "h:1"], ["--coordinator-url", "http://c:9300"],
        ["--engine-type", "blend"], ["--transport", "grpc"], ["--l1-use-hugepages"],
        ["--periodic-notifier-interval-ms=10"],
        ["--runtime-plugin-locations", "/x"], ["--gds-l1-path", "/nvme"],
        ["--l2-store-policy", "skip_l1"], ["--hash-algorithm", "builtin"],
        ["--enable-tracing"], ["--otlp-endpoint", "http://o:4317"],
    ],
)  # fmt: skip
def test_unsupported_upstream_flags_are_refused_in_one_line(flags: list[str]) -> None:
    result = lmcache("server", *flags)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert flags[0].split("=")[0] in lines[0]
    assert "not supported by this implementation" in lines[0]


def test_upstream_eviction_flags_are_ours() -> None:
    """--eviction-trigger-watermark / --eviction-ratio and upstream's policy names are
    our own settings now: passed through untouched, and parsed (case-insensitive)."""
    from lmcache.settings import ServerSettings

    argv = ["--eviction-policy", "isolatedlru", "--eviction-trigger-watermark", "0.8",
            "--eviction-ratio=0.2"]  # fmt: skip
    assert translate(argv) == argv
    s = ServerSettings(eviction_policy="isolatedlru", eviction_trigger_watermark=0.8)
    assert (s.eviction_policy, s.eviction_trigger_watermark, s.eviction_ratio) == (
        "IsolatedLRU", 0.8, 0.2,
    )  # fmt: skip
    for name in ("ARC", "noop", "NOOP", "arc", "lru", "fifo"):
        assert ServerSettings(eviction_policy=name).eviction_policy.upper() == name.upper()
    result = lmcache("server", "--eviction-policy", "MRU")
    assert result.returncode == 2 and "choose one of LRU, LFU, FIFO, ARC" in result.stderr
    result = lmcache("server", "--eviction-trigger-watermark", "1.5")
    assert result.returncode == 2 and "--eviction-trigger-watermark" in result.stderr


def test_translation_table() -> None:
    assert translate(["--worker-reap-timeout-seconds", "90"]) == ["--engine-timeout-s", "90"]
    assert translate(["--session-ttl-seconds=30"]) == ["--lock-ttl-s", "30"]
    assert translate(["--l2-prefetch-policy", "default"]) == ["--l2-prefetch-policy", "order"]
    assert translate(["--transport", "zmq", "--no-isolated-ipc", "--port", "1"]) == [
        "--port", "1",
    ]  # fmt: skip
    with pytest.raises(UpstreamFlagError, match="one lock and session lifetime"):
        translate(["--session-ttl-seconds", "600", "--l1-read-ttl-seconds", "300"])
    with pytest.raises(UpstreamFlagError, match="--l1-align-bytes 512"):
        translate(["--l1-align-bytes", "512"])


def test_bad_value_of_a_new_setting_names_the_flag() -> None:
    result = lmcache("server", "--prometheus-port", "0")
    assert result.returncode == 2 and "--prometheus-port" in result.stderr
    result = lmcache("server", "--instance-id", "a b")
    assert result.returncode == 2 and "--instance-id" in result.stderr
