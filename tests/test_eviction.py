"""Eviction and locks against a real server: one contract suite run over every policy."""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pytest

from lmcache.client import LMCacheClient
from lmcache.engine.shm_kv import ShmKVCache
from lmcache.errors import CacheMissError

from .conftest import CHUNK, MODEL, ServerProcess, register, start_server, unique_tokens

CHUNK_BYTES = 4 * 16 * 2048  # the `engine` fixture: 4 layers x 16 blocks x 2 KiB
L1_FOR_4_CHUNKS = str(4 * CHUNK_BYTES / (1 << 30))

# Access pattern (logical clock): store A B C D; look up A three times, B once, C once.
#   LRU  last access: D(4) < A(7) < B(8) < C(9)   -> two more stores evict D, A
#   LFU  hits:        D(0) < B(1,8) < C(1,9) < A(3) -> evict D, then the new E (0 hits)
#   FIFO insertion:   A < B < C < D               -> evict A, B
EXPECTED_SURVIVORS = {"LRU": "BCEF", "LFU": "ABCF", "FIFO": "CDEF"}


@pytest.fixture(params=sorted(EXPECTED_SURVIVORS))
def small_server(request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    s = start_server(
        "--l1-size-gb", L1_FOR_4_CHUNKS, "--eviction-policy", request.param, "--lock-ttl-s", "1.5"
    )
    yield s
    s.stop()


def _store(
    client: LMCacheClient, engine: ShmKVCache, seqs: dict[str, np.ndarray], name: str, iid: int
) -> None:
    reply = client.store(f"store-{name}", iid, seqs[name], start=0, end=CHUNK, block_ids=range(16))
    assert reply.stored_tokens == CHUNK, reply


def _hit(client: LMCacheClient, seqs: dict[str, np.ndarray], name: str) -> bool:
    rid = f"probe-{name}-{time.monotonic_ns()}"
    hit = client.lookup(rid, seqs[name], **MODEL) == CHUNK
    client.end_session(rid)
    return hit


def test_eviction_order_follows_policy(small_server: ServerProcess, engine: ShmKVCache) -> None:
    policy = small_server.http().get("/status").json()["config"]["eviction_policy"]
    client = small_server.client()
    register(client, engine, 1)
    seqs = {name: unique_tokens(CHUNK) for name in "ABCDEF"}
    for name in "ABCD":
        _store(client, engine, seqs, name, 1)
    for name in "AAABC":
        assert _hit(client, seqs, name)
    _store(client, engine, seqs, "E", 1)
    _store(client, engine, seqs, "F", 1)
    survivors = "".join(n for n in "ABCDEF" if client.lookup(f"final-{n}", seqs[n], **MODEL))
    assert survivors == EXPECTED_SURVIVORS[policy]
    stats = small_server.http().get("/status").json()["l1"]
    assert stats["evictions"] == 2
    metrics = small_server.http().get("/metrics").text
    assert "lmcache_l1_evictions_total 2.0" in metrics


def test_locked_chunks_are_never_evicted_and_locks_expire(
    small_server: ServerProcess, engine: ShmKVCache
) -> None:
    client = small_server.client()
    register(client, engine, 2)
    seqs = {name: unique_tokens(CHUNK) for name in "ABCDE"}
    for name in "ABCD":
        _store(client, engine, seqs, name, 2)
        # Lookup locks each chunk and the session is left open (an engine that died).
        assert client.lookup(f"hold-{name}", seqs[name], **MODEL) == CHUNK

    reply = client.store("store-E", 2, seqs["E"], start=0, end=CHUNK, block_ids=range(16))
    assert reply.no_space and reply.stored_tokens == 0
    assert all(_hit(client, seqs, n) for n in "ABCD")  # nothing locked was evicted
    status = small_server.http().get("/status").json()
    assert status["l1"]["locked"] == 4
    assert status["sessions"]["active"] >= 4

    time.sleep(3.0)  # lock TTL 1.5 s, maintenance every 1 s
    status = small_server.http().get("/status").json()
    assert status["l1"]["locked"] == 0 and status["l1"]["leases"] == 0
    _store(client, engine, seqs, "E", 2)
    small_server.wait_log("Expired")


def test_clear_with_active_locks(small_server: ServerProcess, engine: ShmKVCache) -> None:
    client = small_server.client()
    register(client, engine, 3)
    tokens = unique_tokens(2 * CHUNK)
    client.store("s", 3, tokens, start=0, end=2 * CHUNK, block_ids=range(32))
    assert client.lookup("held", tokens, **MODEL) == 2 * CHUNK

    http = small_server.http()
    response = http.post("/clear-cache")
    assert response.status_code == 200 and response.json()["status"] == "ok"
    l1 = http.get("/status").json()["l1"]
    assert (l1["objects"], l1["used_bytes"], l1["locked"], l1["doomed_pending"]) == (0, 0, 0, 0)

    with pytest.raises(CacheMissError):
        client.retrieve("held", 3, tokens, start=0, end=2 * CHUNK, block_ids=range(32))
    assert client.lookup("after", tokens, **MODEL) == 0
    client.end_session("held")
    client.end_session("after")
    # The cache works again after a clear.
    assert (
        client.store("s2", 3, tokens, start=0, end=CHUNK, block_ids=range(16)).stored_tokens
        == CHUNK
    )
    assert http.get("/healthcheck").json() == {"status": "healthy"}
