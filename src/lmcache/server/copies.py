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
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from lmcache.engine.transfer import skip_blocks
from lmcache.errors import BadRequestError
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
from lmcache.server.registry import Engine, EngineRegistry, check_identity
from lmcache.server.sessions import Sessions
from lmcache.storage.chunk_store import ChunkStore, Fill, WriteResult
from lmcache.storage.keyspace import KeySpace
from lmcache.types import ObjectKey

logger = logging.getLogger("lmcache.server")


class Copies:
    def __init__(
        self,
        store: ChunkStore,
        keys: KeySpace,
        registry: EngineRegistry,
        sessions: Sessions,
        metrics: Metrics,
    ) -> None:
        self._conflicts_logged: set[int] = set()
        self.store = store
        self.keys = keys
        self.registry = registry
        self.sessions = sessions
        self.chunk_size = keys.chunk_size
        self.metrics = metrics

    # ----- requests -------------------------------------------------------------------------

    def store_blocks(self, req: Store) -> StoreReply:
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

    def retrieve_blocks(self, req: Retrieve) -> RetrieveReply:
        engine = self.registry.get(req.instance_id)
        transfer = engine.require_transfer()
        keys, ids = self.chunk_keys(engine, req)
        try:
            skip = skip_blocks(req.skip_tokens, req.end - req.start, engine.layout.block_size)
        except ValueError as exc:
            raise BadRequestError(str(exc)) from None
        tokens = req.end - req.start - req.skip_tokens
        start = time.perf_counter()
        with self._read(req, engine, keys) as chunks:
            for i, src in enumerate(chunks):
                transfer.scatter(src, ids, i, skip)
        record_retrieve(self.metrics, tokens, len(keys) * engine.chunk_bytes, start)
        return RetrieveReply(id=req.id, retrieved_tokens=tokens)

    def retrieve_bytes(self, req: RetrieveBytes) -> tuple[ChunkData, list[bytes]]:
        engine = self.registry.get(req.instance_id)
        keys = self.range_keys(engine, req)
        start = time.perf_counter()
        with self._read(req, engine, keys) as chunks:
            # A copy: ZMQ sends after we unpin, and the pages may be reused by then.
            frames = [src.tobytes() for src in chunks]
        nbytes = len(keys) * engine.chunk_bytes
        record_retrieve(self.metrics, req.end - req.start, nbytes, start)
        return ChunkData(id=req.id, chunks=len(frames), chunk_bytes=engine.chunk_bytes), frames

    # ----- the storage steps, through the store ------------------------------------------------

    def _write(self, rid: int, engine: Engine, keys: list[ObjectKey], fill: Fill) -> StoreReply:
        start = time.perf_counter()
        result = self.store.write(keys, engine.chunk_layout, fill)
        if result.conflicts:
            self._warn_conflict(engine)
        record_store(
            self.metrics, result, chunks=len(keys), chunk_size=self.chunk_size,
            chunk_bytes=engine.chunk_bytes, started=start,
        )  # fmt: skip
        c = self.chunk_size
        return StoreReply(
            id=rid, stored_tokens=result.stored * c, cached_tokens=result.cached * c,
            no_space=result.no_space, conflict_tokens=result.conflicts * c,
        )  # fmt: skip

    def _warn_conflict(self, engine: Engine) -> None:
        if engine.instance_id not in self._conflicts_logged:
            self._conflicts_logged.add(engine.instance_id)
            logger.warning(
                "GPU ID %d stores chunks already cached with another layout under the same "
                "model identity; give engines with different layouts different kv_spec values",
                engine.instance_id,
            )

    @contextmanager
    def _read(
        self, req: Retrieve | RetrieveBytes, engine: Engine, keys: list[ObjectKey]
    ) -> Iterator[list[np.ndarray]]:
        what = f"tokens [{req.start}, {req.end}) of request {req.request_id[:200]!r}"
        owner = f"retrieve:{req.request_id}"
        with self.store.read(keys, engine.layout_tag, owner, what) as chunks:
            # Our own pins now protect the chunks: the lookup's locks on them can go.
            self.sessions.release(req.request_id, keys)
            yield chunks

    # ----- validation ---------------------------------------------------------------------------

    def chunk_keys(self, engine: Engine, req: Store | Retrieve) -> tuple[list[ObjectKey], Any]:
        """Validate a store/retrieve and return its keys and block ids."""
        keys = self.range_keys(engine, req)
        blocks = (req.end - req.start) // engine.layout.block_size
        return keys, engine.check_block_ids(req.block_ids, blocks)

    def range_keys(self, engine: Engine, req: ChunkRange) -> list[ObjectKey]:
        """Validate a chunk-aligned token range and return the keys of its chunks."""
        check_identity(engine.model_name, engine.world_size, engine.dtype, req.cache_salt)
        digest = self.keys.digest(engine.namespace(req.cache_salt))
        return self.keys.range_keys(digest, req.tokens, req.start, req.end)


def record_store(
    metrics: Metrics, result: WriteResult, *, chunks: int, chunk_size: int, chunk_bytes: int,
    started: float,
) -> None:  # fmt: skip
    """Log and count a finished store (shared memory, bytes, or a worker's commit)."""
    tokens = result.stored * chunk_size
    if result.stored:
        logger.info("Stored %d tokens in %.3f seconds", tokens, time.perf_counter() - started)
    if result.no_space:
        metrics.store_no_space.inc()
        logger.warning("L1 is full of locked chunks: stored %d of %d chunks", result.stored, chunks)
    metrics.stored_tokens.inc(tokens)
    metrics.stored_bytes.inc(result.stored * chunk_bytes)


def record_retrieve(metrics: Metrics, tokens: int, nbytes: int, started: float) -> None:
    logger.info("Retrieved %d tokens in %.3f seconds", tokens, time.perf_counter() - started)
    metrics.retrieved_tokens.inc(tokens)
    metrics.retrieved_bytes.inc(nbytes)
