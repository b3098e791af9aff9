"""Requests that move KV bytes, run on the worker pool.

Two ways in and out of L1, one write loop and one read loop:

    store / retrieve               the server copies blocks from/to the engine's
                                   shared memory (engine_driven; `KVTransfer`)
    store_bytes / retrieve_bytes   the bytes travel in ZMQ data frames (an engine
                                   that shares no memory with the server)

Writes reserve each chunk, fill it outside the L1 lock and commit it; reads pin
every chunk first (all or nothing), copy, and fail if a clear raced the copy.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from lmcache.engine.registry import Engine, EngineRegistry, check_identity
from lmcache.engine.transfer import skip_blocks
from lmcache.errors import BadRequestError, CacheMissError, TransferError
from lmcache.protocol.messages import (
    ChunkData,
    ChunkRange,
    Retrieve,
    RetrieveBytes,
    RetrieveReply,
    Store,
    StoreBytes,
    StoreReply,
)
from lmcache.server.metrics import Metrics
from lmcache.server.sessions import Sessions
from lmcache.storage.keys import TOKEN_BYTES, ChunkHasher, object_key
from lmcache.storage.l1 import L1Cache, Lease
from lmcache.types import ObjectKey

logger = logging.getLogger("lmcache.server")

Fill = Callable[[int, np.ndarray], None]  # (chunk index, L1 destination bytes)


class Copies:
    def __init__(
        self,
        l1: L1Cache,
        registry: EngineRegistry,
        sessions: Sessions,
        hasher: ChunkHasher,
        metrics: Metrics,
        *,
        on_stored: Callable[[ObjectKey, bytes], None] | None = None,
    ) -> None:
        self.on_stored = on_stored  # a chunk landed in L1 (the L2 write-behind hook)
        self._conflicts_logged: set[int] = set()
        self.l1 = l1
        self.registry = registry
        self.sessions = sessions
        self.hasher = hasher
        self.chunk_size = hasher.chunk_size
        self.metrics = metrics

    # ----- requests -------------------------------------------------------------------------

    def store(self, req: Store) -> StoreReply:
        engine = self.registry.get(req.instance_id)
        transfer = engine.require_transfer()
        keys, ids = self.chunk_keys(engine, req)
        return self._write(req.id, engine, keys, lambda i, dst: transfer.gather(ids, i, dst))

    def store_bytes(self, req: StoreBytes, data: list[memoryview]) -> StoreReply:
        engine = self.registry.get(req.instance_id)
        keys = self.range_keys(engine, req)
        if len(data) != len(keys):
            raise BadRequestError(
                f"expected {len(keys)} data frames (one per chunk), got {len(data)}"
            )
        if any(frame.nbytes != engine.chunk_bytes for frame in data):
            raise BadRequestError(f"every data frame must hold {engine.chunk_bytes} bytes")

        def fill(i: int, dst: np.ndarray) -> None:
            np.copyto(dst, np.frombuffer(data[i], dtype=np.uint8))

        return self._write(req.id, engine, keys, fill)

    def retrieve(self, req: Retrieve) -> RetrieveReply:
        engine = self.registry.get(req.instance_id)
        transfer = engine.require_transfer()
        keys, ids = self.chunk_keys(engine, req)
        try:
            skip = skip_blocks(req.skip_tokens, req.end - req.start, engine.layout.block_size)
        except ValueError as exc:
            raise BadRequestError(str(exc)) from None
        tokens = req.end - req.start - req.skip_tokens
        self._read(req, engine, keys, lambda i, src: transfer.scatter(src, ids, i, skip), tokens)
        return RetrieveReply(id=req.id, retrieved_tokens=tokens)

    def retrieve_bytes(self, req: RetrieveBytes) -> tuple[ChunkData, list[bytes]]:
        engine = self.registry.get(req.instance_id)
        keys = self.range_keys(engine, req)
        frames: list[bytes] = []
        # A copy: ZMQ sends after we unpin, and the pages may be reused by then.
        self._read(
            req, engine, keys, lambda i, src: frames.append(src.tobytes()), req.end - req.start
        )
        return ChunkData(id=req.id, chunks=len(frames), chunk_bytes=engine.chunk_bytes), frames

    # ----- the two loops ----------------------------------------------------------------------

    def _write(self, rid: int, engine: Engine, keys: list[ObjectKey], fill: Fill) -> StoreReply:
        start = time.perf_counter()
        stored = cached = conflicts = 0
        no_space = False
        for i, key in enumerate(keys):
            slot = self.l1.reserve_write(key, engine.chunk_bytes, tag=engine.layout_tag)
            if slot == "cached":
                cached += 1
                continue
            if slot == "conflict":
                self._warn_conflict(engine)
                conflicts += 1
                continue
            if slot == "no_space":
                no_space = True
                break
            try:
                fill(i, self.l1.view(slot.offset, slot.nbytes))
            except BaseException:
                self.l1.abort_write(slot)
                raise
            if self.l1.commit_write(slot):
                stored += 1
                if self.on_stored is not None:
                    self.on_stored(key, engine.layout_tag)
        elapsed = time.perf_counter() - start
        tokens = stored * self.chunk_size
        if stored:
            logger.info("Stored %d tokens in %.3f seconds", tokens, elapsed)
        if no_space:
            self.metrics.store_no_space.inc()
            logger.warning("L1 is full of locked chunks: stored %d of %d chunks", stored, len(keys))
        self.metrics.stored_tokens.inc(tokens)
        self.metrics.stored_bytes.inc(stored * engine.chunk_bytes)
        c = self.chunk_size
        return StoreReply(
            id=rid, stored_tokens=tokens, cached_tokens=cached * c, no_space=no_space,
            conflict_tokens=conflicts * c,
        )  # fmt: skip

    def _warn_conflict(self, engine: Engine) -> None:
        if engine.instance_id not in self._conflicts_logged:
            self._conflicts_logged.add(engine.instance_id)
            logger.warning(
                "GPU ID %d stores chunks already cached with another layout under the same "
                "model identity; give engines with different layouts different kv_spec values",
                engine.instance_id,
            )

    def _read(
        self,
        req: Retrieve | RetrieveBytes,
        engine: Engine,
        keys: list[ObjectKey],
        read: Fill,
        tokens: int,
    ) -> None:
        start = time.perf_counter()
        lease = self._pin(req, engine, keys)
        try:
            for i, (offset, nbytes) in enumerate(lease.offsets(keys)):
                read(i, self.l1.view(offset, nbytes))
        finally:
            intact = self.l1.release(lease)
        if not intact:
            raise TransferError("the cache was cleared during the retrieve; recompute")
        logger.info("Retrieved %d tokens in %.3f seconds", tokens, time.perf_counter() - start)
        self.metrics.retrieved_tokens.inc(tokens)
        self.metrics.retrieved_bytes.inc(len(keys) * engine.chunk_bytes)

    def _pin(self, req: Retrieve | RetrieveBytes, engine: Engine, keys: list[ObjectKey]) -> Lease:
        lease = self.l1.acquire_all(keys, owner=f"retrieve:{req.request_id}", tag=engine.layout_tag)
        if lease is None:
            raise CacheMissError(
                f"chunks for tokens [{req.start}, {req.end}) of request {req.request_id[:200]!r} "
                "are not cached (evicted, cleared or stored with another layout); recompute them"
            )
        # Our own pins now protect the chunks: the lookup's locks on them can go.
        self.sessions.release(req.request_id, keys)
        return lease

    # ----- validation ---------------------------------------------------------------------------

    def chunk_keys(self, engine: Engine, req: Store | Retrieve) -> tuple[list[ObjectKey], Any]:
        """Validate a store/retrieve and return its keys and block ids."""
        keys = self.range_keys(engine, req)
        blocks = (req.end - req.start) // engine.layout.block_size
        return keys, engine.check_block_ids(req.block_ids, blocks)

    def range_keys(self, engine: Engine, req: ChunkRange) -> list[ObjectKey]:
        """Validate a chunk-aligned token range and return the keys of its chunks."""
        start, end, c = req.start, req.end, self.chunk_size
        if end < start or start % c or end % c:
            raise BadRequestError(
                f"token range [{start}, {end}) must be chunk-aligned (chunk size {c})"
            )
        if len(req.tokens) % TOKEN_BYTES:
            raise BadRequestError("tokens must be little-endian uint32 (a multiple of 4 bytes)")
        if len(req.tokens) // TOKEN_BYTES < end:
            raise BadRequestError(
                f"range ends at token {end} but only {len(req.tokens) // 4} tokens sent"
            )
        check_identity(engine.model_name, engine.world_size, engine.dtype, req.cache_salt)
        digest = engine.namespace_digest(req.cache_salt)
        hashes = self.hasher.hashes(req.tokens, end // c)[start // c :]
        return [object_key(digest, h) for h in hashes]
