"""Partial chunks ("finer tails"): a prompt's whole blocks past its last whole chunk.

Keys and the key space in isolation; then a server built in process (no sockets), whose
handler serves the same requests a real one does: stores, lookups, retrieves, the
bounds it enforces, and how partial chunks live beside an L2 tier (L1 only).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from lmcache.errors import BadRequestError
from lmcache.protocol.messages import (
    ChunkData,
    Commit,
    Committed,
    ErrorReply,
    KVLayout,
    LayerPlacement,
    Lookup,
    LookupReply,
    Ok,
    Prepared,
    PrepareStore,
    QueryLookup,
    RegisterKV,
    RetrieveBytes,
    StoreBytes,
    StoreReply,
    WorkerCopy,
)
from lmcache.server.build import Core, build
from lmcache.server.metrics import Metrics
from lmcache.server.registry import EngineRegistry
from lmcache.settings import ServerSettings
from lmcache.storage.keys import ChunkHasher
from lmcache.storage.keyspace import KeySpace
from lmcache.storage.l2.memory import MemoryL2
from lmcache.transport.zmq_server import Deferred

from .conftest import MODEL, unique_tokens

C, BS, BB = 8, 2, 16  # tokens per chunk, tokens per block, bytes per block (one layer)
BPC = C // BS


def as_bytes(tokens: np.ndarray) -> bytes:
    return tokens.astype("<u4").tobytes()


# ----- keys ------------------------------------------------------------------------------


def test_partial_keys_never_equal_whole_keys_and_chain_over_every_token() -> None:
    hasher = ChunkHasher(C)
    tokens = as_bytes(unique_tokens(3 * C))
    whole = hasher.hashes(tokens, 3)
    partials = [hasher.partial_hashes(tokens, k, BS, BPC - 1) for k in range(3)]
    flat = [h for p in partials for h in p]
    assert len(set(flat)) == len(flat) == 3 * (BPC - 1)  # every position and length differs
    assert not set(flat) & set(whole)
    # Incremental hashing agrees with hashing the partial's tokens at once.
    assert hasher.partial_hashes(tokens, 1, 3 * BS, 1)[0] == partials[1][2]
    # Any earlier token, in an earlier chunk or earlier in the same one, changes the key.
    for flip in (0, C - 1, C, C + 1):
        other = bytearray(tokens)
        other[flip * 4] ^= 1
        assert ChunkHasher(C).partial_hashes(bytes(other), 1, BS, 2)[1] != partials[1][1]
    # A token after the partial chunk does not.
    later = bytearray(tokens)
    later[(C + 2 * BS) * 4] ^= 1
    assert ChunkHasher(C).partial_hashes(bytes(later), 1, BS, 2)[1] == partials[1][1]


def test_range_keys_end_on_a_chunk_or_on_whole_blocks() -> None:
    keys = KeySpace(ChunkHasher(C))
    tokens = as_bytes(unique_tokens(3 * C))
    d = b"\0" * 16
    whole = keys.range_keys(d, tokens, 0, 2 * C)
    mixed = keys.range_keys(d, tokens, 0, 2 * C + 2 * BS, BS)
    assert mixed[:2] == whole and len(mixed) == 3 and mixed[2] not in whole
    assert keys.range_keys(d, tokens, 2 * C, 2 * C + 2 * BS, BS) == mixed[2:]
    for start, end, bs in ((0, 2 * C + 3, BS), (0, 2 * C + BS, 0), (1, 2 * C, BS)):
        with pytest.raises(BadRequestError, match="chunk-aligned"):
            keys.range_keys(d, tokens, start, end, bs)
    # Lookup candidates: longest first, only as far as the tokens reach.
    found = keys.tail_groups([d], tokens[: (2 * C + 2 * BS + 1) * 4], 2, BS)
    assert [t for t, _ in found] == [2 * BS, BS]
    assert found[0][1] == [mixed[2]]


# ----- a server in process ------------------------------------------------------------------


@pytest.fixture
def core() -> Iterator[Core]:
    yield from _core()


@pytest.fixture
def core_l2() -> Iterator[Core]:
    yield from _core(MemoryL2())


def _core(*adapters: MemoryL2) -> Iterator[Core]:
    c = build(
        ServerSettings(chunk_size=C), np.zeros(1 << 20, dtype=np.uint8),
        registry=EngineRegistry(C), metrics=Metrics(dict), adapters=list(adapters),
    )  # fmt: skip
    if c.tiers is not None:
        c.tiers.start()
    layout = KVLayout(
        num_layers=1, num_blocks=64, block_size=BS, block_bytes=BB, block_stride=BB,
        layers=[LayerPlacement(segment=0, offset=0)],
    )  # fmt: skip
    reg = RegisterKV(id=1, instance_id=1, layout=layout, memory=WorkerCopy(), rank=0, **MODEL)
    assert c.handler.dispatch(reg) == Ok(id=1)
    try:
        yield c
    finally:
        if c.tiers is not None:
            c.tiers.stop()


def run(core: Core, req: Any, data: list[memoryview] | None = None) -> Any:
    out = core.handler.dispatch(req, data)
    return out.run() if isinstance(out, Deferred) else out


def frames_for(start: int, end: int, seed: int) -> list[memoryview]:
    """One frame per chunk of ``[start, end)``: whole chunks, then the partial one."""
    sizes = [BPC * BB] * ((end - start) // C) + ([end % C // BS * BB] if end % C else [])
    rng = np.random.default_rng(seed)
    return [memoryview(rng.integers(0, 256, n, dtype=np.uint8).tobytes()) for n in sizes]


def store(core: Core, tokens: bytes, start: int, end: int, seed: int = 1) -> Any:
    req = StoreBytes(id=2, request_id="s", instance_id=1, tokens=tokens, start=start, end=end)
    return run(core, req, frames_for(start, end, seed))


def lookup(core: Core, rid: str, tokens: bytes, block_size: int = BS) -> int | None:
    reply = run(core, Lookup(id=3, request_id=rid, tokens=tokens, block_size=block_size, **MODEL))
    assert isinstance(reply, LookupReply), reply
    return reply.hit_tokens


def retrieve(core: Core, tokens: bytes, start: int, end: int) -> Any:
    req = RetrieveBytes(id=4, request_id="r", instance_id=1, tokens=tokens, start=start, end=end)
    return run(core, req)


def test_a_partial_tail_is_stored_found_and_read_back(core: Core) -> None:
    tokens = as_bytes(unique_tokens(3 * C + 3))
    end = 2 * C + 3 * BS  # 2 whole chunks, then 3 of a chunk's 4 blocks
    reply = store(core, tokens, 0, end)
    assert isinstance(reply, StoreReply) and reply.stored_tokens == end
    assert store(core, tokens, 0, end).cached_tokens == end  # stored once
    assert lookup(core, "a", tokens) == end
    assert lookup(core, "b", tokens, block_size=0) == 2 * C  # an engine that says no block size
    # The same prefix in a longer prompt: the 3-block partial, though the prompt has more.
    longer = tokens[: end * 4] + as_bytes(unique_tokens(2 * C))
    assert lookup(core, "c", longer) == end
    # A token changed in the partial's last block: no partial of 3 blocks (none of 1 or 2).
    other = bytearray(tokens)
    other[(end - 1) * 4] ^= 1
    assert lookup(core, "d", bytes(other)) == 2 * C
    reply, frames = retrieve(core, tokens, 0, end)
    assert isinstance(reply, ChunkData) and [len(f) for f in frames] == [64, 64, 48]
    assert frames == [bytes(f) for f in frames_for(0, end, 1)]
    _, only = retrieve(core, tokens, 2 * C, end)  # just the partial chunk
    assert only == frames[2:]


def test_the_longest_partial_wins_and_shorter_ones_serve_shorter_prompts(core: Core) -> None:
    tokens = as_bytes(unique_tokens(3 * C))
    store(core, tokens, 0, C + BS, seed=1)
    store(core, tokens, C, C + 3 * BS, seed=2)
    assert lookup(core, "a", tokens) == C + 3 * BS
    assert lookup(core, "b", tokens[: (C + 2 * BS + 1) * 4]) == C + BS
    # A whole chunk always beats a partial one at the same position.
    store(core, tokens, 0, 2 * C, seed=3)
    assert lookup(core, "c", tokens) == 2 * C


def test_bounds_hold_for_partial_chunks(core: Core) -> None:
    tokens = as_bytes(unique_tokens(3 * C))

    def refused(reply: Any, what: str) -> None:
        assert isinstance(reply, ErrorReply), reply
        assert what in reply.message, reply.message

    # Not whole blocks of the engine.
    refused(store(core, tokens, 0, C + 1), "chunk-aligned")
    # A partial frame of the wrong size.
    bad = frames_for(0, C + 2 * BS, 1)
    bad[-1] = memoryview(bytes(BB))
    refused(
        run(core, StoreBytes(id=5, request_id="s", instance_id=1, tokens=tokens, start=0,
                             end=C + 2 * BS), bad),
        "data frame",
    )  # fmt: skip
    # A block size that does not divide the chunk.
    refused(run(core, Lookup(id=6, request_id="x", tokens=tokens, block_size=3, **MODEL)), "3")
    # Stored as a partial, never read as a whole chunk or a longer partial (a miss).
    store(core, tokens, 0, C + 2 * BS)
    refused(retrieve(core, tokens, 0, 2 * C), "not cached")
    refused(retrieve(core, tokens, 0, C + 3 * BS), "not cached")
    assert core.store.l1.stats()["writing"] == 0


def test_partial_chunks_stay_in_l1_and_follow_an_l2_prefetch(core_l2: Core) -> None:
    core = core_l2
    assert core.tiers is not None
    tokens = as_bytes(unique_tokens(3 * C))
    end = 2 * C + BS
    store(core, tokens, 0, end)
    deadline = time.monotonic() + 10
    while core.tiers.status()[0]["stored_objects"] < 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.2)
    assert core.tiers.status()[0]["stored_objects"] == 2  # the whole chunks only
    # L1 loses everything but the partial: the whole chunks come back from L2, then the
    # partial after them is found in L1.
    core.store.clear()
    store(core, tokens, 2 * C, end)
    hit = lookup(core, "p", tokens)
    deadline = time.monotonic() + 10
    while hit is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
        reply = run(core, QueryLookup(id=7, request_id="p"))
        hit = reply.hit_tokens
    assert hit == end


def test_a_prepared_store_commits_or_drops_its_partial_slot(core: Core) -> None:
    tokens = as_bytes(unique_tokens(2 * C))
    end = C + 2 * BS

    def prepare() -> Prepared:
        req = PrepareStore(id=8, request_id="s", instance_id=1, tokens=tokens, start=0, end=end)
        reply = run(core, req)
        assert isinstance(reply, Prepared) and len(reply.offsets) == 2, reply
        return reply

    dropped = prepare()
    assert run(core, Commit(id=9, instance_id=1, transfer_id=dropped.transfer_id, success=False))
    assert core.store.l1.stats()["writing"] == 0 and lookup(core, "a", tokens) == 0
    kept = prepare()
    reply = run(core, Commit(id=10, instance_id=1, transfer_id=kept.transfer_id))
    assert isinstance(reply, Committed) and reply.tokens == end
    assert lookup(core, "b", tokens) == end
    again = prepare()  # cached now: nothing to write, the partial included
    assert again.offsets == [-1, -1]
    run(core, Commit(id=11, instance_id=1, transfer_id=again.transfer_id))
