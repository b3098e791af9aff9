"""Eviction policies against a real server: /quota routes with IsolatedLRU (stores of
one salt never evict another's), their admin rule, and watermark eviction in the
background, observed in /status."""

from __future__ import annotations

import time
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from lmcache.http.app import create_app

from .conftest import CHUNK, MODEL, engine, register, start_server, unique_tokens
from .http_probe import IdleServer, ask

__all__ = ["engine"]
CHUNK_BYTES = 4 * 16 * 2048  # the `engine` fixture: 4 layers x 16 blocks x 2 KiB
GiB = 1 << 30
TOKEN = "an-admin-token-that-is-long-enough-0123456789"


def _chunks_gb(n: int) -> float:
    return n * CHUNK_BYTES / GiB


def _l1_gb(chunks: int) -> str:
    """--l1-size-gb for exactly ``chunks`` chunks (a hair more: GiB floats round down)."""
    return str(_chunks_gb(chunks) + 1e-7)


def _store(client: Any, iid: int, tokens: Any, salt: str) -> Any:
    n = len(tokens) // CHUNK
    return client.store(f"s-{time.monotonic_ns()}", iid, tokens, start=0, end=n * CHUNK,
                        block_ids=range(n * CHUNK // 16), cache_salt=salt)  # fmt: skip


def _hits(client: Any, tokens: Any, salt: str) -> int:
    rid = f"l-{time.monotonic_ns()}"
    hit = client.lookup(rid, tokens, cache_salt=salt, **MODEL)
    client.end_session(rid)
    return int(hit or 0) // CHUNK


def test_quota_routes_and_salt_isolation(engine: Any) -> None:
    srv = start_server("--l1-size-gb", _l1_gb(8), "--eviction-policy", "isolatedlru")
    try:
        http, client = srv.http(), srv.client()
        register(client, engine, 1)
        assert http.get("/quota").json()["quotas"] == []
        assert http.get("/quota/tenant-b").status_code == 404
        for bad in ({"limit_gb": -1}, {"limit_gb": "lots"}, {}, {"limit_gb": float(1 << 21)}):
            assert http.put("/quota/tenant-a", json=bad).status_code == 422, bad
        assert http.put("/quota/" + "x" * 300, json={"limit_gb": 1}).status_code == 400
        assert http.put("/quota/tenant-a", json={"limit_gb": _chunks_gb(2)}).status_code == 200

        b = unique_tokens(4 * CHUNK)
        refused = _store(client, 1, b, "tenant-b")  # no quota and no default: 0 bytes
        assert refused.no_space and refused.stored_tokens == 0
        assert (
            http.put("/quota/tenant-b", json={"limit_gb": _chunks_gb(4)}).json()["status"] == "ok"
        )
        assert _store(client, 1, b, "tenant-b").stored_tokens == 4 * CHUNK
        for _ in range(3):  # tenant-a stores 12 chunks into its 2: only its own go
            _store(client, 1, unique_tokens(4 * CHUNK), "tenant-a")
        assert _hits(client, b, "tenant-b") == 4
        quotas = {q["cache_salt"]: q for q in http.get("/quota").json()["quotas"]}
        assert quotas["tenant-a"]["used_gb"] == _chunks_gb(2)
        assert quotas["tenant-b"]["used_gb"] == _chunks_gb(4)

        lowered = http.put("/quota/tenant-b", json={"limit_gb": _chunks_gb(1)}).json()
        assert lowered["evicted"] == 3 and lowered["used_gb"] == _chunks_gb(1)
        assert http.delete("/quota/tenant-b").json()["evicted"] == 1
        assert http.get("/quota/tenant-b").status_code == 404
        assert http.delete("/quota/tenant-b").status_code == 404
        assert http.put("/quota/_default", json={"limit_gb": _chunks_gb(1)}).status_code == 200
        assert _store(client, 1, unique_tokens(CHUNK), "").stored_tokens == CHUNK
        status = http.get("/status").json()
        assert status["eviction"]["policy"] == "IsolatedLRU"
        assert "tenant-a" not in str(status) and "tenant-a" not in srv.log()
        http.close()
    finally:
        srv.stop()


class _Fake(IdleServer):
    """An idle server with an empty quota table."""

    def list(self) -> dict[str, Any]:
        return {"quotas": []}

    def get(self, name: str) -> dict[str, Any]:
        return {}

    def set(self, name: str, limit_gb: float) -> dict[str, Any]:
        return {}

    def delete(self, name: str) -> dict[str, Any]:
        return {}


@pytest.mark.parametrize(
    ("method", "path", "kw"),
    [("GET", "/quota", {}), ("GET", "/quota/a", {}), ("PUT", "/quota/a", {"json": {"limit_gb": 1}}),
     ("DELETE", "/quota/a", {})],
)  # fmt: skip
def test_quota_routes_are_admin_even_to_read(method: str, path: str, kw: dict[str, Any]) -> None:
    fake = _Fake()
    app = create_app(fake, metrics=CollectorRegistry(), admin_token=TOKEN, quotas=lambda: fake)
    assert ask(app, "10.0.0.7", (method, path, kw)) == [401]
    bearer = {**kw, "headers": {"Authorization": f"Bearer {TOKEN}"}}
    assert ask(app, "10.0.0.7", (method, path, bearer)) == [200]
    assert ask(app, "127.0.0.1", (method, path, kw)) == [200]
    assert ask(app, "10.0.0.7", ("GET", "/status", {})) == [200]  # other reads stay open


def test_watermark_evicts_in_the_background(engine: Any) -> None:
    srv = start_server(
        "--l1-size-gb", _l1_gb(10), "--eviction-trigger-watermark", "0.7",
        "--eviction-ratio", "0.3", "--eviction-interval-s", "0.1",
    )  # fmt: skip
    try:
        http, client = srv.http(), srv.client()
        register(client, engine, 2)
        first, second = unique_tokens(4 * CHUNK), unique_tokens(4 * CHUNK)
        assert _store(client, 2, first, "").stored_tokens == 4 * CHUNK  # 40%: below
        time.sleep(0.5)
        assert http.get("/status").json()["eviction"]["runs"] == 0
        assert _store(client, 2, second, "").stored_tokens == 4 * CHUNK  # 80%: above
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            status = http.get("/status").json()
            if status["eviction"]["evicted"]:
                break
            time.sleep(0.1)
        ev, l1 = status["eviction"], status["l1"]
        assert ev["alive"] and ev["runs"] >= 1 and ev["watermark"] == 0.7
        assert ev["evicted"] == 4 and l1["used_bytes"] == 4 * CHUNK_BYTES  # down to 40%
        assert _hits(client, first, "") == 0 and _hits(client, second, "") == 4  # LRU order
        srv.wait_log("above watermark 0.70; triggering eviction.")
        assert http.get("/healthcheck").json() == {"status": "healthy"}
        http.close()
    finally:
        srv.stop()
