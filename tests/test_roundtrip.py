"""Store → lookup → retrieve through a real server process, real ZMQ, real shared memory."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest

from lmcache.engine.shm_kv import ShmKVCache
from lmcache.errors import BadRequestError, CacheMissError, ForbiddenError, UnknownEngineError
from lmcache.protocol.messages import ShmMemory, WorkerCopy

from .conftest import BLOCK, CHUNK, MODEL, ServerProcess, fill_random, register, unique_tokens


def test_store_lookup_retrieve_is_byte_exact(server: ServerProcess, engine: ShmKVCache) -> None:
    client = server.client()
    register(client, engine, 101)
    server.wait_log("Registered KV cache for GPU ID 101 with 4 layers")
    fill_random(engine, 1)
    tokens = unique_tokens(3 * CHUNK + 100)  # the 100-token tail is never stored
    src_blocks = list(range(0, 48))
    reply = client.store("r1", 101, tokens, start=0, end=3 * CHUNK, block_ids=src_blocks)
    assert reply.stored_tokens == 3 * CHUNK and reply.cached_tokens == 0
    server.wait_log("Stored 768 tokens in ")
    original = engine.blocks[:, :, src_blocks].copy()

    assert client.lookup("r2", tokens, **MODEL) == 3 * CHUNK
    engine.blocks[...] = 0xAB  # poison: retrieved bytes must come from the cache
    dst_blocks = list(range(63, 15, -1))
    assert client.retrieve("r2", 101, tokens, start=0, end=3 * CHUNK, block_ids=dst_blocks) == 768
    server.wait_log("Retrieved 768 tokens in ")
    np.testing.assert_array_equal(engine.blocks[:, :, dst_blocks], original)
    client.end_session("r2")


def test_partial_prefix_hit_and_skip(server: ServerProcess, engine: ShmKVCache) -> None:
    client = server.client()
    register(client, engine, 102)
    fill_random(engine, 2)
    tokens = unique_tokens(2 * CHUNK)
    client.store("a", 102, tokens, start=0, end=2 * CHUNK, block_ids=range(32))
    original = engine.blocks[:, :, :32].copy()

    other = tokens.copy()
    other[CHUNK + 5] += 1  # diverges in the second chunk
    assert client.lookup("b", other, **MODEL) == CHUNK
    other[3] += 1  # diverges in the first chunk
    assert client.lookup("c", other, **MODEL) == 0
    # A longer prompt with the same prefix hits both chunks.
    longer = np.concatenate([tokens, unique_tokens(CHUNK)])
    assert client.lookup("d", longer, **MODEL) == 2 * CHUNK

    # skip_tokens leaves blocks the engine already has untouched.
    engine.blocks[...] = 0
    skip = 3 * BLOCK
    client.retrieve(
        "d", 102, longer, start=0, end=2 * CHUNK, block_ids=range(32, 64), skip_tokens=skip
    )
    assert not engine.blocks[:, :, 32:35].any()
    np.testing.assert_array_equal(engine.blocks[:, :, 35:64], original[:, :, 3:32])
    for rid in "bcd":
        client.end_session(rid)


def test_store_twice_is_idempotent_and_query_lookup(
    server: ServerProcess, engine: ShmKVCache
) -> None:
    client = server.client()
    register(client, engine, 103)
    tokens = unique_tokens(CHUNK)
    assert (
        client.store("x", 103, tokens, start=0, end=CHUNK, block_ids=range(16)).stored_tokens
        == CHUNK
    )
    again = client.store("x", 103, tokens, start=0, end=CHUNK, block_ids=range(16))
    assert again.stored_tokens == 0 and again.cached_tokens == CHUNK
    assert client.lookup("q", tokens, **MODEL) == CHUNK
    assert client.query_lookup("q") == CHUNK
    assert client.query_lookup("never-looked-up") == 0
    client.end_session("q")


def test_namespaces_isolate_salt_model_and_dtype(server: ServerProcess, engine: ShmKVCache) -> None:
    client = server.client()
    register(client, engine, 104)
    tokens = unique_tokens(CHUNK)
    client.store("s", 104, tokens, start=0, end=CHUNK, block_ids=range(16), cache_salt="tenant-a")
    assert client.lookup("s1", tokens, **MODEL, cache_salt="tenant-a") == CHUNK
    assert client.lookup("s2", tokens, **MODEL, cache_salt="tenant-b") == 0
    assert client.lookup("s3", tokens, **MODEL) == 0
    assert (
        client.lookup("s4", tokens, model_name="other", dtype="bfloat16", cache_salt="tenant-a")
        == 0
    )
    assert client.lookup("s5", tokens, model_name="m", dtype="float32", cache_salt="tenant-a") == 0
    assert client.lookup("s6", tokens, **(MODEL | {"world_size": 2}), cache_salt="tenant-a") == 0
    for i in range(1, 7):
        client.end_session(f"s{i}")


def test_retrieve_of_missing_chunks_is_a_typed_miss(
    server: ServerProcess, engine: ShmKVCache
) -> None:
    client = server.client()
    register(client, engine, 105)
    with pytest.raises(CacheMissError, match="not cached"):
        client.retrieve("m", 105, unique_tokens(CHUNK), start=0, end=CHUNK, block_ids=range(16))


def test_bad_requests_get_typed_errors(server: ServerProcess, engine: ShmKVCache) -> None:
    client = server.client()
    register(client, engine, 106)
    tokens = unique_tokens(2 * CHUNK)
    with pytest.raises(UnknownEngineError, match="GPU ID 999"):
        client.store("e", 999, tokens, start=0, end=CHUNK, block_ids=range(16))
    with pytest.raises(BadRequestError, match="chunk-aligned"):
        client.store("e", 106, tokens, start=0, end=100, block_ids=range(7))
    with pytest.raises(BadRequestError, match="out of range"):
        client.store("e", 106, tokens, start=0, end=CHUNK, block_ids=[*range(15), 64])
    with pytest.raises(BadRequestError, match="expected 16 block ids"):
        client.store("e", 106, tokens, start=0, end=CHUNK, block_ids=range(3))
    with pytest.raises(BadRequestError, match="only 256 tokens"):
        client.store("e", 106, tokens[:CHUNK], start=0, end=2 * CHUNK, block_ids=range(32))
    with pytest.raises(BadRequestError, match="does not exist"):
        client.register(
            107, model_name="m", world_size=1, rank=0, dtype="bf16",
            layout=engine.layout, memory=ShmMemory(segments=["/lmcache_kv_0_999"], tokens=["00"]),
        )  # fmt: skip
    with pytest.raises(ForbiddenError, match="not an engine KV segment"):
        client.register(
            107, model_name="m", world_size=1, rank=0, dtype="bf16",
            layout=engine.layout, memory=ShmMemory(segments=["../../etc/passwd"], tokens=["00"]),
        )  # fmt: skip
    # Still serving, and no lock or memory leaked.
    assert client.ping().chunk_size == CHUNK
    status = server.http().get("/status").json()
    assert status["l1"]["writing"] == 0


def test_ping_token_and_registration_flag(server: ServerProcess, engine: ShmKVCache) -> None:
    client = server.client()
    before = client.ping(instance_id=108)
    assert not before.engine_registered
    register(client, engine, 108)
    after = client.ping(instance_id=108)
    assert after.engine_registered and after.server_token == before.server_token
    client.unregister(108)
    server.wait_log("Unregistered KV cache for GPU ID 108")
    assert not client.ping(instance_id=108).engine_registered


def test_bytes_in_the_message_round_trip(server: ServerProcess, engine: ShmKVCache) -> None:
    """An engine that shares no memory (another host) sends and receives chunk bytes."""
    client = server.client()
    client.register(
        109, model_name="m", world_size=1, rank=0, dtype="bfloat16",
        layout=engine.layout, memory=WorkerCopy(),
    )  # fmt: skip
    chunk_bytes = 4 * 16 * 2048
    rng = np.random.default_rng(9)
    chunks = [rng.integers(0, 256, chunk_bytes, dtype=np.uint8) for _ in range(2)]
    tokens = unique_tokens(2 * CHUNK)
    reply = client.store_bytes("b", 109, tokens, start=0, end=2 * CHUNK, chunks=chunks)
    assert reply.stored_tokens == 2 * CHUNK
    assert client.lookup("b2", tokens, **MODEL) == 2 * CHUNK
    frames = client.retrieve_bytes("b2", 109, tokens, start=0, end=2 * CHUNK)
    assert [bytes(f) for f in frames] == [c.tobytes() for c in chunks]
    with pytest.raises(BadRequestError, match="expected 2 data frames"):
        client.store_bytes("b", 109, tokens, start=0, end=2 * CHUNK, chunks=chunks[:1])
    with pytest.raises(BadRequestError, match=f"must hold {chunk_bytes} bytes"):
        client.store_bytes("b", 109, tokens, start=0, end=CHUNK, chunks=[b"x"])
    client.end_session("b2")


def test_chunks_of_another_layout_are_a_miss(server: ServerProcess, engine: ShmKVCache) -> None:
    client = server.client()
    register(client, engine, 110)
    other = msgspec.structs.replace(
        engine.layout, block_bytes=1024, block_stride=512, plane_stride=64 * 512
    )
    client.register(
        111, model_name="m", world_size=1, rank=0, dtype="bfloat16",
        layout=other, memory=engine.memory,
    )  # fmt: skip
    tokens = unique_tokens(CHUNK)
    client.store("l", 111, tokens, start=0, end=CHUNK, block_ids=range(16))
    with pytest.raises(CacheMissError, match="another layout"):
        client.retrieve("l", 110, tokens, start=0, end=CHUNK, block_ids=range(16))


def test_prepared_transfers_belong_to_their_engine(
    server: ServerProcess, engine: ShmKVCache
) -> None:
    client = server.client()
    for iid in (112, 113):
        client.register(
            iid, model_name="m", world_size=1, rank=0, dtype="bfloat16",
            layout=engine.layout, memory=WorkerCopy(),
        )  # fmt: skip
    prepared = client.prepare_store("p", 112, unique_tokens(CHUNK), start=0, end=CHUNK)
    with pytest.raises(BadRequestError, match="unknown or expired transfer"):
        client.commit(113, prepared.transfer_id)
    assert client.commit(112, prepared.transfer_id, success=False) == 0


def test_a_copy_that_starts_after_the_engine_stopped_waiting_is_refused(
    server: ServerProcess, engine: ShmKVCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An engine-driven copy queued on the server past the request's ``start_by`` (half the
    engine's wait) touches nothing: the engine may have reused those blocks meanwhile."""
    import time

    from lmcache.errors import TransferError

    client = server.client()
    register(client, engine, 108)
    fill_random(engine, 8)
    tokens = unique_tokens(CHUNK)
    # The client's clock (`lmcache.client` reads `time.monotonic`) at zero, so its start_by
    # (now + half its wait) is long past on the server's clock, the same host's. (An hour
    # behind went negative on a CI machine up for less than an hour: a malformed request.)
    monkeypatch.setattr(time, "monotonic", lambda: 0.0)
    with pytest.raises(TransferError, match="after the engine stopped waiting"):
        client.store("late", 108, tokens, start=0, end=CHUNK, block_ids=range(16))
    with pytest.raises(TransferError, match="nothing was copied"):
        client.retrieve("late", 108, tokens, start=0, end=CHUNK, block_ids=range(16))
    monkeypatch.undo()
    assert client.lookup("late", tokens, **MODEL) == 0  # the late store stored nothing
    client.end_session("late")
    reply = client.store("s", 108, tokens, start=0, end=CHUNK, block_ids=range(16))
    assert reply.stored_tokens == CHUNK  # in time: stored
