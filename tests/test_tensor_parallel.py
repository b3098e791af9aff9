"""Tensor parallelism without vLLM: two `WorkerSide` ranks (world size 2) of one engine,
each with its own KV memory, against a real `lmcache server`.

Per-rank KV (ordinary attention: each rank holds its heads' shard) is stored under each
rank's own keys, and a lookup hits only as far as every rank stored. KV that every rank
shares (MLA's latent, ``kv_spec`` marked `SHARED_KV`) has one key per chunk: rank 0
writes it, every rank reads it, and an engine of another TP size finds it too.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest

from lmcache.engine.shm_kv import ShmKVCache
from lmcache.integration.vllm.config import ConnectorConfig, TransferMode
from lmcache.integration.vllm.identity import CacheIdentity
from lmcache.integration.vllm.link import ServerLink
from lmcache.integration.vllm.metadata import LoadSpec, Metadata, ParallelStrategy, StoreSpec
from lmcache.integration.vllm.worker import WorkerSide
from lmcache.storage.keys import SHARED_KV

from .conftest import BLOCK, CHUNK, ServerProcess, fill_random, lookup_hit, unique_tokens

BPC = CHUNK // BLOCK
WORLD = 2
SENTINEL = 0xCD


@dataclass
class Rank:
    worker: WorkerSide
    kv: ShmKVCache

    def blocks(self, ids: list[int]) -> np.ndarray:
        return self.kv.blocks[:, :, ids].copy()


def identity(kv_spec: str, world_size: int = WORLD) -> CacheIdentity:
    return CacheIdentity(
        model_name="tp", world_size=world_size, dtype="bfloat16", kv_spec=kv_spec,
        block_size=BLOCK,
    )  # fmt: skip


def start_rank(
    server: ServerProcess, ident: CacheIdentity, rank: int, mode: TransferMode, planes: int
) -> Rank:
    kv = ShmKVCache(num_layers=3, num_blocks=64, block_size=BLOCK, block_bytes=2048, planes=planes)
    config = ConnectorConfig(host="tcp://localhost", port=server.port, heartbeat_interval=3600)
    worker = WorkerSide(
        ServerLink(config), ident, ParallelStrategy(world_size=ident.world_size, rank=rank),
        mode, can_load=True, can_store=True, async_store=False,
        instance_id=os.getpid() * 8 + rank + 4 * (ident.world_size == 1),
    )  # fmt: skip
    worker.register_memory(
        kv.layout, [kv.segment.array], [kv.segment] if mode == "engine_driven" else []
    )
    return Rank(worker, kv)


def stop(ranks: list[Rank]) -> None:
    for r in ranks:
        r.worker.shutdown()
        r.kv.close()


MODES = ["lmcache_driven", "engine_driven"]


@pytest.fixture(params=MODES)
def per_rank(request: pytest.FixtureRequest, server: ServerProcess) -> Iterator[list[Rank]]:
    spec = f"numpy-tp-{request.node.name}"  # a fresh identity per test: no leftovers
    ranks = [start_rank(server, identity(spec), r, request.param, planes=2) for r in range(WORLD)]
    for r, rank in enumerate(ranks):
        fill_random(rank.kv, 10 + r)  # each rank its own shard
    yield ranks
    stop(ranks)


def chunks(n: int, seed: int) -> tuple[list[int], list[int], list[int]]:
    ids = np.random.default_rng(seed).permutation(64).tolist()
    return unique_tokens(n * CHUNK).tolist(), ids[: n * BPC], ids[n * BPC : 2 * n * BPC]


def store(rank: Rank, tokens: list[int], ids: list[int], end: int) -> None:
    rank.worker.save(Metadata(stores=[StoreSpec("s", tokens[:end], 0, end, ids[: end // BLOCK])]))


def load(rank: Rank, tokens: list[int], ids: list[int], end: int) -> set[int]:
    """Load ``[0, end)`` into ``ids``; the blocks reported as load errors."""
    spec = LoadSpec("l", tokens[:end], 0, end, ids[: end // BLOCK])
    rank.worker.start_load(Metadata(loads=[spec]))
    rank.worker.save(Metadata())  # ends the step
    return rank.worker.load_errors()


def hit(server: ServerProcess, ident: CacheIdentity, tokens: list[int], rid: str) -> int:
    client = server.client()  # closed with the server fixture
    found = lookup_hit(
        client, rid, np.asarray(tokens, dtype=np.uint32), model_name=ident.model_name,
        world_size=ident.world_size, dtype=ident.dtype, kv_spec=ident.kv_spec,
    )  # fmt: skip
    client.end_session(rid)
    return found


class TestPerRankKV:
    def test_a_lookup_hits_only_as_far_as_every_rank_stored(
        self, server: ServerProcess, per_rank: list[Rank]
    ) -> None:
        tokens, src, _ = chunks(3, 1)
        ident = per_rank[0].worker.identity
        store(per_rank[0], tokens, src, 3 * CHUNK)
        assert hit(server, ident, tokens, "a") == 0  # rank 1 has nothing yet
        store(per_rank[1], tokens, src, 2 * CHUNK)
        assert hit(server, ident, tokens, "b") == 2 * CHUNK
        store(per_rank[1], tokens, src, 3 * CHUNK)
        assert hit(server, ident, tokens, "c") == 3 * CHUNK

    def test_each_rank_loads_its_own_shard(self, per_rank: list[Rank]) -> None:
        tokens, src, dst = chunks(2, 2)
        originals = [r.blocks(src) for r in per_rank]
        assert not np.array_equal(originals[0], originals[1])
        for r in per_rank:
            store(r, tokens, src, 2 * CHUNK)
            r.kv.blocks[:, :, dst] = SENTINEL
        for r, original in zip(per_rank, originals, strict=True):
            assert load(r, tokens, dst, 2 * CHUNK) == set()
            np.testing.assert_array_equal(r.blocks(dst), original)

    def test_a_rank_that_fails_its_load_reports_load_errors(self, per_rank: list[Rank]) -> None:
        """vLLM recomputes the blocks a rank reports (every rank's, as its scheduler is
        one): the other rank's good load does not hide it."""
        tokens, src, dst = chunks(2, 3)
        for r in per_rank:
            store(r, tokens, src, 2 * CHUNK)
            r.kv.blocks[:, :, dst] = SENTINEL
        bad = per_rank[1].worker
        bad.link.client.unregister(bad.instance_id)  # as after the server lost this rank
        assert load(per_rank[0], tokens, dst, 2 * CHUNK) == set()
        assert load(per_rank[1], tokens, dst, 2 * CHUNK) == set(dst[: 2 * BPC])
        assert (per_rank[1].blocks(dst) == SENTINEL).all()


@pytest.fixture(params=MODES)
def shared(request: pytest.FixtureRequest, server: ServerProcess) -> Iterator[list[Rank]]:
    """Two ranks of an MLA-like engine: one plane per block (the latent), the same bytes on
    both ranks (vLLM computes the whole latent on every rank)."""
    spec = f"numpy-mla-{request.node.name};{SHARED_KV}"
    ranks = [start_rank(server, identity(spec), r, request.param, planes=1) for r in range(WORLD)]
    fill_random(ranks[0].kv, 20)
    ranks[1].kv.blocks[...] = ranks[0].kv.blocks
    yield ranks
    stop(ranks)


class TestSharedKV:
    def test_rank_0_writes_every_rank_reads(
        self, server: ServerProcess, shared: list[Rank]
    ) -> None:
        tokens, src, dst = chunks(2, 4)
        ident = shared[0].worker.identity
        original = shared[0].blocks(src)
        store(shared[1], tokens, src, 2 * CHUNK)
        assert hit(server, ident, tokens, "a") == 0  # rank 1 never writes
        store(shared[0], tokens, src, 2 * CHUNK)
        assert hit(server, ident, tokens, "b") == 2 * CHUNK
        for r in shared:
            r.kv.blocks[:, :, dst] = SENTINEL
            assert load(r, tokens, dst, 2 * CHUNK) == set()
            np.testing.assert_array_equal(r.blocks(dst), original)

    def test_stored_once_whatever_the_world_size(
        self, server: ServerProcess, shared: list[Rank]
    ) -> None:
        """One object per chunk in L1, and an engine of TP size 1 with the same spec finds
        what the TP=2 engine stored (its ranks all held the whole latent)."""
        tokens, src, dst = chunks(2, 5)
        before = server.http().get("/status").json()["l1"]["objects"]
        for r in shared:
            store(r, tokens, src, 2 * CHUNK)
        assert server.http().get("/status").json()["l1"]["objects"] == before + 2
        ident = shared[0].worker.identity
        single = identity(ident.kv_spec, world_size=1)
        assert hit(server, single, tokens, "c") == 2 * CHUNK
        one = start_rank(server, single, 0, "lmcache_driven", planes=1)
        try:
            one.kv.blocks[:, :, dst] = SENTINEL
            assert load(one, tokens, dst, 2 * CHUNK) == set()
            np.testing.assert_array_equal(one.blocks(dst), shared[0].blocks(src))
        finally:
            stop([one])


def test_shared_keys_leave_rank_and_world_size_out() -> None:
    from lmcache.storage.keys import ChunkHasher, Namespace
    from lmcache.storage.keyspace import KeySpace

    shared = [Namespace("m", w, r, "bf16", f"x;{SHARED_KV}").digest for w, r in [(1, 0), (2, 1)]]
    assert shared[0] == shared[1]
    per_rank = {Namespace("m", 2, r, "bf16", "x").digest for r in range(2)}
    assert len(per_rank) == 2 and shared[0] not in per_rank
    keys = KeySpace(ChunkHasher(CHUNK))
    assert keys.rank_digests("m", 4, "bf16", f"x;{SHARED_KV}", "") == shared[:1]
    assert len(keys.rank_digests("m", 4, "bf16", "x", "")) == 4


def test_only_replicated_latent_kv_is_shared() -> None:
    from lmcache.integration.vllm.identity import latent_kv_shared

    assert latent_kv_shared(True, 1, 1)
    assert not latent_kv_shared(False, 1, 1)  # per-head shards
    assert not latent_kv_shared(True, 2, 1)  # pipeline stages hold other layers
    assert not latent_kv_shared(True, 1, 2)  # decode-context parallelism splits tokens
