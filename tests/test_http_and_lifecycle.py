"""HTTP endpoints (httpx against the running server), startup and shutdown."""

from __future__ import annotations

import asyncio
import os
import signal

import httpx
import pytest

from lmcache.cli import build_parser, settings_from_args
from lmcache.defaults import L2_BREAKER_S, L2_PREFETCH_WORKERS, L2_QUEUE_SIZE, L2_WRITERS
from lmcache.engine.shm_kv import ShmKVCache
from lmcache.http.app import create_app
from lmcache.processes import free_port
from lmcache.server.runtime import ServerRuntime
from lmcache.settings import ServerSettings

from .conftest import CHUNK, MODEL, ServerProcess, register, start_server, unique_tokens


def test_healthcheck(server: ServerProcess) -> None:
    response = server.http().get("/healthcheck")
    assert response.status_code == 200
    assert response.json() == {"status": "healthy"}


def test_status_describes_every_component(server: ServerProcess, engine: ShmKVCache) -> None:
    client = server.client()
    register(client, engine, 201)
    tokens = unique_tokens(CHUNK)
    client.store("st", 201, tokens, start=0, end=CHUNK, block_ids=range(16))
    client.lookup("st-open", tokens, **MODEL)
    status = server.http().get("/status").json()
    assert status["ready"] and status["healthy"]
    l1 = status["l1"]
    assert l1["capacity_bytes"] == int(0.25 * (1 << 30))
    assert l1["objects"] >= 1 and l1["used_bytes"] >= 4 * 16 * 2048 and l1["locked"] >= 1
    assert l1["eviction_policy"] == "LRU" and l1["shm_segment"].startswith("/lmcache_l1_pool_")
    assert status["l2_adapters"] == []
    assert {w["name"]: w["alive"] for w in status["workers"]} == {
        "zmq-loop": True, "worker-pool": True, "maintenance": True,
    }  # fmt: skip
    engines = {e["instance_id"]: e for e in status["engines"]}
    assert engines[201]["num_layers"] == 4 and engines[201]["block_size"] == 16
    assert engines[201]["transfer"] == "shm"
    assert "st-open" in {s["request_id"] for s in status["sessions"]["items"]}
    assert status["config"]["chunk_size"] == CHUNK and status["config"]["port"] == server.port
    client.end_session("st-open")


def test_metrics_are_prometheus_text(server: ServerProcess, engine: ShmKVCache) -> None:
    client = server.client()
    register(client, engine, 202)
    tokens = unique_tokens(CHUNK)
    client.store("mt", 202, tokens, start=0, end=CHUNK, block_ids=range(16))
    client.lookup("mt2", tokens, **MODEL)
    client.retrieve("mt2", 202, tokens, start=0, end=CHUNK, block_ids=range(16, 32))
    client.end_session("mt2")
    response = server.http().get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    values = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in response.text.splitlines()
        if line and not line.startswith("#")
    }
    assert values["lmcache_stored_tokens_total"] >= CHUNK
    assert values["lmcache_retrieved_tokens_total"] >= CHUNK
    assert values["lmcache_lookup_hit_tokens_total"] >= CHUNK
    assert values["lmcache_lookup_requested_tokens_total"] >= CHUNK
    assert values["lmcache_l1_capacity_bytes"] == int(0.25 * (1 << 30))
    assert values["lmcache_l1_used_bytes"] > 0
    assert values['lmcache_requests_total{op="store",outcome="ok"}'] >= 1
    assert values['lmcache_request_duration_seconds_count{op="retrieve"}'] >= 1


def test_openapi_docs(server: ServerProcess) -> None:
    http = server.http()
    assert http.get("/docs").status_code == 200
    paths = http.get("/openapi.json").json()["paths"]
    assert {"/healthcheck", "/status", "/clear-cache", "/metrics"} <= set(paths)


def test_health_is_503_until_ready() -> None:
    runtime = ServerRuntime(ServerSettings(l1_size_gb=0.01))
    transport = httpx.ASGITransport(app=create_app(runtime, metrics=runtime.metrics.registry))

    async def probe() -> tuple[httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
            return await http.get("/healthcheck"), await http.post("/clear-cache")

    health, clear = asyncio.run(probe())
    assert health.status_code == 503
    assert health.json() == {"status": "unhealthy", "reasons": ["starting"]}
    assert clear.status_code == 503


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly_and_unlinks_shared_memory(sig: int, engine: ShmKVCache) -> None:
    s = start_server()
    pool = s.http().get("/status").json()["l1"]["shm_segment"]
    assert os.path.exists("/dev/shm" + pool)
    register(s.client(), engine, 301)
    assert s.stop(sig) == 0
    assert not os.path.exists("/dev/shm" + pool)
    assert "LMCache cache server stopped" in s.log()
    assert os.path.exists("/dev/shm" + engine.memory.segments[0])  # the engine's stays its own


def test_port_in_use_fails_with_a_clear_error(server: ServerProcess) -> None:
    second = start_server("--port", str(server.port), wait=False)
    assert second.proc.wait(timeout=30) == 1
    assert "cannot bind ZMQ endpoint" in second.log()
    assert f"another process holds port {server.port}: start with --port N" in second.log()


def test_invalid_flag_names_the_flag() -> None:
    second = start_server("--eviction-policy", "RANDOM", wait=False)
    assert second.proc.wait(timeout=30) != 0
    assert "--eviction-policy" in second.log()


def _server_settings(*argv: str) -> ServerSettings:
    """What `lmcache server ARGV` would run with (flags, then ``LMCACHE_*``, then defaults)."""
    values = vars(build_parser().parse_args(["server", *argv]))
    values.pop("command")
    return settings_from_args(values)


def test_tuning_flags_reach_the_objects_they_configure(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = _server_settings()
    assert (
        defaults.l2_queue_size, defaults.l2_prefetch_workers, defaults.l2_writers,
        defaults.l2_breaker_s,
    ) == (L2_QUEUE_SIZE, L2_PREFETCH_WORKERS, L2_WRITERS, L2_BREAKER_S)  # fmt: skip
    assert defaults.hash_memo_bytes == 64 << 20
    monkeypatch.setenv("LMCACHE_L2_BREAKER_S", "0.25")  # a variable works like a flag
    settings = _server_settings(
        "--l1-size-gb", "0.01", "--port", str(free_port()),
        "--l2-adapter", '{"type": "memory"}', "--l2-queue-size", "7",
        "--l2-prefetch-workers", "3", "--l2-writers", "4", "--hash-memo-mb", "0",
        "--copy-threads", "3",
    )  # fmt: skip
    runtime = ServerRuntime(settings)
    runtime.start()
    try:
        tiers = runtime.tiers
        assert tiers is not None and runtime._handler is not None
        assert (tiers.write_behind.size, tiers.prefetch_workers, tiers.breaker_s) == (7, 3, 0.25)
        assert tiers._prefetch._max_workers == 3
        assert tiers.writers == 4 and sum(w.is_alive() for w in tiers._writers) == 4
        assert runtime._handler.keys.hasher.memo_bytes == 0
        assert runtime.registry.copy_threads == 3  # each engine's ShmTransfer gets it
    finally:
        runtime.stop()


def test_environment_variables_configure_the_server(engine: ShmKVCache) -> None:
    s = start_server(env={"LMCACHE_CHUNK_SIZE": "512", "LMCACHE_EVICTION_POLICY": "fifo"})
    try:
        config = s.http().get("/status").json()["config"]
        assert config["chunk_size"] == 512 and config["eviction_policy"] == "FIFO"
        assert s.client().ping().chunk_size == 512
    finally:
        s.stop()
