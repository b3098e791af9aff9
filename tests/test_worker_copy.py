"""lmcache_driven transfers: the worker copies into the server's L1 pool itself."""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pytest

from lmcache.client import LMCacheClient
from lmcache.engine.shm_kv import ShmKVCache
from lmcache.errors import BadRequestError, CacheMissError, TransferError
from lmcache.protocol.messages import WorkerCopy
from lmcache.storage.shm import ShmSegment

from .conftest import CHUNK, MODEL, ServerProcess, fill_random, start_server, unique_tokens

BPC = CHUNK // 16


@pytest.fixture(scope="module")
def wc_server() -> Iterator[ServerProcess]:
    s = start_server("--lock-ttl-s", "1")
    yield s
    s.stop()


def setup_worker(
    server: ServerProcess, kv: ShmKVCache, iid: int
) -> tuple[LMCacheClient, ShmSegment]:
    client = server.client()
    client.register(
        iid, model_name="m", world_size=1, rank=0, dtype="bfloat16",
        layout=kv.layout, memory=WorkerCopy(),
    )  # fmt: skip
    pong = client.ping()
    pool = ShmSegment.attach(pong.l1_pool, bytes.fromhex(pong.l1_pool_seal))
    return client, pool


def chunk_view(pool: ShmSegment, kv: ShmKVCache, offset: int, nbytes: int) -> np.ndarray:
    return pool.array[offset : offset + nbytes].reshape(kv.blocks.shape[0], 2, BPC, -1)


def test_worker_copy_round_trip(wc_server: ServerProcess, engine: ShmKVCache) -> None:
    client, pool = setup_worker(wc_server, engine, 401)
    fill_random(engine, 4)
    tokens = unique_tokens(2 * CHUNK)
    prepared = client.prepare_store("w", 401, tokens, start=0, end=2 * CHUNK)
    assert len(prepared.offsets) == 2 and not prepared.no_space and prepared.ttl_s == 1
    for i, offset in enumerate(prepared.offsets):
        dst = chunk_view(pool, engine, offset, prepared.chunk_bytes)
        np.take(engine.blocks, np.arange(i * BPC, (i + 1) * BPC), axis=2, out=dst)
    assert client.lookup("before-commit", tokens, **MODEL) == 0  # not visible until committed
    assert client.commit(401, prepared.transfer_id) == 2 * CHUNK
    wc_server.wait_log("Stored 512 tokens in ")
    original = engine.blocks[:, :, : 2 * BPC].copy()
    again = client.prepare_store("w", 401, tokens, start=0, end=2 * CHUNK)
    assert again.offsets == [-1, -1] and client.commit(401, again.transfer_id) == 0

    assert client.lookup("r", tokens, **MODEL) == 2 * CHUNK
    engine.blocks[...] = 0
    ready = client.prepare_retrieve("r", 401, tokens, start=0, end=2 * CHUNK)
    for i, offset in enumerate(ready.offsets):
        src = chunk_view(pool, engine, offset, ready.chunk_bytes)
        engine.blocks[:, :, 32 + i * BPC : 32 + (i + 1) * BPC] = src
    assert client.commit(401, ready.transfer_id) == 2 * CHUNK
    wc_server.wait_log("Retrieved 512 tokens in ")
    np.testing.assert_array_equal(engine.blocks[:, :, 32:64], original)
    client.end_session("r")
    client.end_session("before-commit")
    # This engine shares no memory, so the server-copy requests are refused clearly.
    with pytest.raises(BadRequestError, match="prepare_store"):
        client.store("x", 401, tokens, start=0, end=CHUNK, block_ids=range(BPC))
    pool.close()


def test_late_commit_and_clear_fail_cleanly(wc_server: ServerProcess, engine: ShmKVCache) -> None:
    client, pool = setup_worker(wc_server, engine, 402)
    tokens = unique_tokens(CHUNK)
    slow = client.prepare_store("slow", 402, tokens, start=0, end=CHUNK)
    time.sleep(2.5)  # TTL 1 s: the slots leave the index (their pages stay ours)
    with pytest.raises(TransferError, match="outlived its TTL"):
        client.commit(402, slow.transfer_id)
    assert client.lookup("slow-check", tokens, **MODEL) == 0
    client.end_session("slow-check")

    done = client.prepare_store("ok", 402, tokens, start=0, end=CHUNK)
    assert client.commit(402, done.transfer_id) == CHUNK
    reading = client.prepare_retrieve("reader", 402, tokens, start=0, end=CHUNK)
    assert wc_server.http().post("/clear-cache").json()["status"] == "ok"
    with pytest.raises(TransferError, match="cleared"):
        client.commit(402, reading.transfer_id)
    with pytest.raises(CacheMissError):
        client.prepare_retrieve("reader", 402, tokens, start=0, end=CHUNK)
    l1 = wc_server.http().get("/status").json()["l1"]
    assert (l1["used_bytes"], l1["locked"], l1["writing"]) == (0, 0, 0)
    pool.close()


def test_a_stalled_writer_never_overwrites_another_chunk(
    wc_server: ServerProcess, engine: ShmKVCache
) -> None:
    """A worker that writes after its prepare_store's TTL (it was stopped, swapped out)
    must not land in pages that another chunk got meanwhile."""
    late, pool = setup_worker(wc_server, engine, 403)
    other = wc_server.client()
    other.register(404, rank=0, layout=engine.layout, memory=WorkerCopy(), **MODEL)
    x, y = unique_tokens(CHUNK), unique_tokens(CHUNK)
    prepared = late.prepare_store("stalled", 403, x, start=0, end=CHUNK)
    time.sleep(2.5)  # past the 1 s TTL
    good = np.random.default_rng(5).integers(0, 256, prepared.chunk_bytes, dtype=np.uint8)
    assert other.store_bytes("b", 404, y, start=0, end=CHUNK, chunks=[good]).stored_tokens
    offset = prepared.offsets[0]
    pool.array[offset : offset + prepared.chunk_bytes] = 0xEE  # the stalled worker wakes up
    with pytest.raises(TransferError):
        late.commit(403, prepared.transfer_id)
    assert other.lookup("r", y, **MODEL) == CHUNK
    (got,) = other.retrieve_bytes("r", 404, y, start=0, end=CHUNK)
    assert bytes(got) == good.tobytes()
    other.end_session("r")
    other.unregister(404)
    pool.close()
