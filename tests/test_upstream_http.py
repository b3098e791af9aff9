"""Upstream LMCache's HTTP routes on our real server (/cache/clear, /cache/objects,
/config, /version, /loglevel), the admin rule on the mutating ones, and upstream's
L2 adapter shapes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from lmcache.errors import ConfigError
from lmcache.http.app import create_app
from lmcache.storage.l2 import make_adapter
from lmcache.storage.l2.upstream import from_upstream

from .conftest import CHUNK, ServerProcess, engine, fill_random, register, start_server
from .http_probe import IdleServer, ask

__all__ = ["engine"]
TOKEN = "an-admin-token-that-is-long-enough-0123456789"


@pytest.fixture(scope="module")
def srv() -> Iterator[ServerProcess]:
    s = start_server("--lock-ttl-s", "30", env={"LMCACHE_ADMIN_TOKEN": TOKEN})
    yield s
    s.stop()


def _store(s: ServerProcess, kv: Any, chunks: int, seed: int) -> np.ndarray:
    client = s.client()
    register(client, kv, 400 + seed)
    fill_random(kv, seed)
    tokens = np.arange(chunks * CHUNK, dtype=np.uint32) + seed * 100_000
    client.store(f"st-{seed}", 400 + seed, tokens, start=0, end=chunks * CHUNK,
                 block_ids=range(chunks * CHUNK // 16))  # fmt: skip
    return tokens


def test_config_and_version_show_no_secret(srv: ServerProcess) -> None:
    with srv.http() as http:
        config = http.get("/config")
        assert config.status_code == 200
        assert TOKEN not in config.text and config.json()["admin_token"] == "***"
        assert config.json()["chunk_size"] == CHUNK
        version = http.get("/version").json()
        assert version["version"] and version["instance_id"]
        assert version["instance_id"] == http.get("/status").json()["instance_id"]


def test_cache_clear_upstream_body_and_force(srv: ServerProcess, engine: Any) -> None:
    tokens = _store(srv, engine, 2, seed=1)
    client = srv.client()
    assert client.lookup("holder", tokens, model_name="m", dtype="bfloat16") == 2 * CHUNK
    with srv.http() as http:
        kept = http.post("/cache/clear", json={"tier": "l1", "force": False}).json()
        assert kept["status"] == "ok" and kept["cleared"]["l1_kept"] == 2  # locked by lookup
        forced = http.post("/cache/clear", json={"tier": "l1", "force": True}).json()
        assert forced["cleared"]["l1_removed"] == 2
        assert http.post("/cache/clear").json()["cleared"]["tier"] == "l1"  # no body
        assert http.post("/cache/clear", json={"tier": "l3"}).status_code == 422
        assert http.post("/cache/clear", json={"tier": "all"}).json()["cleared"]["l2_removed"] == 0
        # The quick start's route is unchanged.
        assert http.post("/clear-cache").json()["status"] == "ok"
    client.end_session("holder")


def test_cache_objects_paging_and_delete(srv: ServerProcess, engine: Any) -> None:
    with srv.http() as http:
        http.post("/clear-cache")
        _store(srv, engine, 3, seed=2)
        first = http.get("/cache/objects", params={"page_size": 2}).json()
        assert len(first["entries"]) == 2 and first["next_page_token"]
        rest = http.get("/cache/objects", params={"page_size": 2,
                        "page_token": first["next_page_token"]}).json()  # fmt: skip
        assert len(rest["entries"]) == 1 and rest["next_page_token"] is None
        keys = [e["key"] for e in first["entries"] + rest["entries"]]
        assert len(set(keys)) == 3 and all(e["state"] == "ready" for e in first["entries"])
        for bad in ({"page_size": 0}, {"page_size": 5001}):
            assert http.get("/cache/objects", params=bad).status_code == 422
        assert http.get("/cache/objects", params={"page_token": "zz"}).status_code == 400
        assert http.get("/cache/objects", params={"tier": "l2"}).status_code == 400
        deleted = http.request("DELETE", "/cache/objects", json={"keys": [keys[0]]}).json()
        assert deleted == {"ok": True, "deleted": 1, "skipped": 0}
        left = http.get("/cache/objects").json()["entries"]
        assert keys[0] not in [e["key"] for e in left] and len(left) == 2
        bad_key = http.request("DELETE", "/cache/objects", json={"keys": ["ab"]})
        assert bad_key.status_code == 400 and "keys[0]" in bad_key.text


def test_loglevel(srv: ServerProcess) -> None:
    with srv.http() as http:
        assert http.get("/loglevel").json()["lmcache"] == "INFO"
        params = {"logger_name": "lmcache.http", "level": "debug"}
        assert http.post("/loglevel", params=params).json() == {"lmcache.http": "DEBUG"}
        assert http.get("/loglevel", params={"logger_name": "lmcache.http"}).json() == {
            "lmcache.http": "DEBUG"
        }
        assert http.post("/loglevel", params={"level": "LOUD"}).status_code == 400
        assert http.post("/loglevel", params={"logger_name": "uvicorn", "level": "INFO"}
                         ).status_code == 400  # fmt: skip


class _Fake(IdleServer):
    """An idle server whose upstream admin routes do nothing (clears are noted)."""

    def __init__(self) -> None:
        self.cleared: list[tuple[str, bool]] = []

    def clear_tiers(self, tier: str, force: bool) -> dict[str, int]:
        self.cleared.append((tier, force))
        return {}

    def list_l1(self, after: Any, limit: int) -> tuple[list[dict[str, Any]], None]:
        return [], None

    def delete_l1(self, keys: Any, force: bool) -> tuple[int, int]:
        return len(keys), 0

    def config(self) -> dict[str, Any]:
        return {}

    def version_info(self) -> dict[str, Any]:
        return {}


@pytest.mark.parametrize(
    ("method", "path", "kwargs"),
    [
        ("POST", "/cache/clear", {"json": {"tier": "l1"}}),
        ("DELETE", "/cache/objects", {"json": {"keys": ["00" * 48]}}),
        ("POST", "/loglevel", {"params": {"level": "INFO"}}),
    ],
)
def test_mutating_routes_need_loopback_or_the_token(
    method: str, path: str, kwargs: dict[str, Any]
) -> None:
    fake = _Fake()
    app = create_app(fake, metrics=CollectorRegistry(), admin_token=TOKEN, admin=fake)
    bearer = {**kwargs, "headers": {"Authorization": f"Bearer {TOKEN}"}}
    assert ask(app, "10.0.0.7", (method, path, kwargs), (method, path, bearer),
                ("GET", "/config", {})) == [401, 200, 200]  # fmt: skip
    assert ask(app, "127.0.0.1", (method, path, kwargs)) == [200]
    app = create_app(fake, metrics=CollectorRegistry(), admin=fake)
    assert ask(app, "10.0.0.7", (method, path, kwargs)) == [403]


def test_disabled_metrics_answer_404() -> None:
    fake = _Fake()
    app = create_app(fake, metrics=CollectorRegistry(), serve_metrics=False)
    assert ask(app, "127.0.0.1", ("GET", "/metrics", {})) == [404]
    app = create_app(fake, metrics=CollectorRegistry())
    assert ask(app, "127.0.0.1", ("GET", "/metrics", {})) == [200]


# ----- upstream's L2 adapter shapes ---------------------------------------------------------


def test_adapter_shapes_map_to_ours(tmp_path: Any) -> None:
    assert from_upstream({"type": "fs", "base_path": "/d"}) == {"type": "fs", "path": "/d"}
    resp = from_upstream({"type": "resp", "host": "r", "port": 6380, "username": "u",
                          "password": "p@ss", "num_workers": 8})  # fmt: skip
    assert resp == {"type": "redis", "url": "redis://u:p%40ss@r:6380/0"}
    cluster = {"startup_nodes": "v1:7000,v2:7000", "cluster_mode": True, "tls_enable": True}
    valkey = from_upstream({"type": "valkey", **cluster, "request_timeout": 2})
    assert valkey == {"type": "redis", "url": "rediss://v1:7000,v2:7000", "cluster": True,
                      "timeout_s": 2.0}  # fmt: skip
    standalone = from_upstream({"type": "valkey", "startup_nodes": "v:6379", "database_id": 3})
    assert standalone["url"] == "redis://v:6379/3" and standalone["cluster"] is False
    adapter = make_adapter({"type": "fs", "base_path": str(tmp_path)})
    assert adapter.name.startswith("fs")
    adapter.close()


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"type": "fs", "base_path": 5}, "'path'"),
        ({"type": "fs", "base_path": "/a", "path": "/b"}, "'base_path'"),
        ({"type": "fs", "base_path": "/a", "use_odirect": True}, "'use_odirect'"),
        ({"type": "resp", "port": 6379}, "'host'"),
        ({"type": "resp", "host": "h", "port": "x"}, "'port'"),
        ({"type": "resp", "host": "h", "port": 1, "max_capacity_gb": 5}, "'max_capacity_gb'"),
        ({"type": "valkey"}, "'startup_nodes'"),
        ({"type": "valkey", "startup_nodes": "h"}, "'startup_nodes'"),
        ({"type": "valkey", "startup_nodes": "h:1", "cluster_mode": "yes"}, "'cluster_mode'"),
        ({"type": "valkey", "startup_nodes": "h:1", "ttl_seconds": 60}, "'ttl_seconds'"),
    ],
)
def test_bad_upstream_shapes_name_the_field(config: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        make_adapter(config)
