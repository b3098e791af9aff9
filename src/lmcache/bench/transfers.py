"""Store and retrieve through the server, in both CPU transfer modes.

    engine_driven    the server maps the engine's KV segment and copies blocks itself
                     (one `store` / `retrieve` request per call)
    lmcache_driven   the engine copies into / out of the server's L1 pool itself:
                     `prepare_store` -> gather into the returned offsets -> `commit`

A synthetic engine owns a paged KV cache in shared memory whose blocks are handed out
shuffled, as a paged allocator does. Each timed store uses fresh token ids, so every
chunk is really written; L1 is cleared between repetitions so that nothing evicts
(the eviction phase measures the opposite on purpose).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from lmcache.client import LMCacheClient, ModelFields
from lmcache.engine.shm_kv import ShmKVCache
from lmcache.engine.transfer import BlockCopier
from lmcache.protocol.messages import Prepared, WorkerCopy
from lmcache.storage.shm import ShmSegment

from .harness import random_tokens
from .shapes import ModelShape

Mode = Literal["engine_driven", "lmcache_driven"]
_seeds = itertools.count(1000)


@dataclass(frozen=True)
class Scenario:
    block_tokens: int
    chunk_tokens: int
    mode: Mode
    engines: int

    def label(self) -> str:
        engines = "1 engine" if self.engines == 1 else f"{self.engines} engines"
        return f"block {self.block_tokens}, chunk {self.chunk_tokens}, {self.mode}, {engines}"


def model_fields(shape: ModelShape) -> ModelFields:
    return {"model_name": f"bench/{shape.name}", "world_size": 1, "dtype": "bfloat16"}


class SyntheticEngine:
    """One engine worker: a paged KV cache in shared memory and its own client."""

    def __init__(
        self, shape: ModelShape, sc: Scenario, tokens: int, port: int, instance_id: int
    ) -> None:
        self.shape, self.sc, self.tokens, self.instance_id = shape, sc, tokens, instance_id
        blocks = tokens // sc.block_tokens
        self.kv = ShmKVCache(
            num_layers=shape.layers,
            num_blocks=2 * blocks,
            block_size=sc.block_tokens,
            block_bytes=shape.block_bytes(sc.block_tokens),
        )
        perm = np.random.default_rng(instance_id).permutation(2 * blocks).astype(np.int64)
        self.src_ids, self.dst_ids = perm[:blocks], perm[blocks:]
        self.bpc = sc.chunk_tokens // sc.block_tokens
        self.client = LMCacheClient.connect("127.0.0.1", port, timeout=300)
        self.pool: ShmSegment | None = None
        self.copier: BlockCopier | None = None
        memory = self.kv.memory if sc.mode == "engine_driven" else WorkerCopy()
        self.client.register(
            instance_id, rank=0, layout=self.kv.layout, memory=memory, **model_fields(shape)
        )
        if sc.mode == "lmcache_driven":
            pong = self.client.ping(instance_id)
            self.pool = ShmSegment.attach(pong.l1_pool, bytes.fromhex(pong.l1_pool_seal))
            self.copier = BlockCopier(self.kv.layout, [self.kv.segment.array], self.bpc)

    @property
    def kv_bytes(self) -> int:
        return self.shape.layers * len(self.src_ids) * self.shape.block_bytes(self.sc.block_tokens)

    def fresh_tokens(self) -> bytes:
        return random_tokens(self.tokens, next(_seeds))

    def _rid(self, what: str) -> str:
        return f"bench-{what}-{self.instance_id}"

    def store(self, tokens: bytes) -> None:
        rid, n = self._rid("store"), self.tokens
        if self.sc.mode == "engine_driven":
            reply = self.client.store(
                rid, self.instance_id, tokens, start=0, end=n, block_ids=self.src_ids.tolist()
            )
            stored = reply.stored_tokens
        else:
            stored = self._worker_copy_store(rid, tokens)
        if stored != n:
            raise RuntimeError(f"store wrote {stored} of {n} tokens (is L1 too small?)")

    def _worker_copy_store(self, rid: str, tokens: bytes) -> int:
        prep = self.client.prepare_store(rid, self.instance_id, tokens, start=0, end=self.tokens)
        assert self.copier is not None
        copier = self.copier
        return self._copy_and_commit(prep, lambda chunks: copier.gather_range(self.src_ids, chunks))

    def retrieve(self, tokens: bytes) -> None:
        rid, n = self._rid("retrieve"), self.tokens
        hit = self.client.lookup(rid, tokens, **model_fields(self.shape))
        if hit != n:
            raise RuntimeError(f"lookup before retrieve hit {hit} of {n} tokens")
        if self.sc.mode == "engine_driven":
            got = self.client.retrieve(
                rid, self.instance_id, tokens, start=0, end=n, block_ids=self.dst_ids.tolist()
            )
        else:
            got = self._worker_copy_retrieve(rid, tokens)
        self.client.end_session(rid)
        if got != n:
            raise RuntimeError(f"retrieve returned {got} of {n} tokens")

    def _worker_copy_retrieve(self, rid: str, tokens: bytes) -> int:
        prep = self.client.prepare_retrieve(rid, self.instance_id, tokens, start=0, end=self.tokens)
        assert self.copier is not None
        copier = self.copier
        return self._copy_and_commit(
            prep, lambda chunks: copier.scatter_range(self.dst_ids, [c for _, c in chunks])
        )

    def _copy_and_commit(
        self, prep: Prepared, copy: Callable[[list[tuple[int, np.ndarray]]], None]
    ) -> int:
        """Copy every prepared chunk (offset -1: already cached, skip) with the worker's
        copier, then commit, as the vLLM worker does in ``lmcache_driven`` mode; returns
        the committed tokens."""
        assert self.pool is not None
        pool, size, ok = self.pool.array, prep.chunk_bytes, False
        try:
            copy([(i, pool[o : o + size]) for i, o in enumerate(prep.offsets) if o >= 0])
            ok = True
        finally:
            tokens = self.client.commit(self.instance_id, prep.transfer_id, success=ok)
        return tokens

    def verify_roundtrip(self) -> None:
        """Store random KV, retrieve it into poisoned blocks, compare byte for byte."""
        blocks = self.kv.blocks
        shape = (blocks.shape[0], blocks.shape[1], len(self.src_ids), blocks.shape[3])
        rng = np.random.default_rng(42)
        data = np.frombuffer(rng.bytes(int(np.prod(shape))), dtype=np.uint8).reshape(shape)
        blocks[:, :, self.src_ids] = data
        tokens = self.fresh_tokens()
        self.store(tokens)
        blocks[:, :, self.dst_ids] = 0xAB
        self.retrieve(tokens)
        if not np.array_equal(blocks[:, :, self.dst_ids], data):
            raise RuntimeError(f"{self.sc.label()}: retrieved KV differs from the stored KV")

    def close(self) -> None:
        try:
            self.client.unregister(self.instance_id)
        finally:
            self.client.close()
            if self.copier is not None:
                self.copier.release()
            if self.pool is not None:
                self.pool.close()
            self.kv.close()
