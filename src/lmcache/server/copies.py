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
from lmcache.errors import BadRequestError, TransferError
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
        _check_start_by(req)
        engine = self.registry.get(req.instance_id)
        transfer = engine.require_transfer()
        keys, ids = self.chunk_keys(engine, req)
        return self._write(req, engine, keys, lambda i, dst: transfer.gather(ids, i, dst))

    def store_bytes(self, req: StoreBytes, data: list[memoryview]) -> StoreReply:
        engine = self.registry.get(req.instance_id)
        keys = self.range_keys(engine, req)
        if len(data) != len(keys):
            raise BadRequestError(
                f"expected {len(keys)} data frames (one per chunk), got {len(data)}"
            )
        sizes = self.chunk_sizes(engine, req, len(keys))
        if any(frame.nbytes != n for frame, n in zip(data, sizes, strict=True)):
            raise BadRequestError(
                f"every data frame must hold {engine.chunk_bytes} bytes (a partial last "
                f"chunk: {sizes[-1]})"
            )

        def fill(i: int, dst: np.ndarray) -> None:
            np.copyto(dst, np.frombuffer(data[i], dtype=np.uint8))

        return self._write(req, engine, keys, fill)

    def retrieve_blocks(self, req: Retrieve) -> RetrieveReply:
        _check_start_by(req)
        engine = self.registry.get(req.instance_id)
        transfer = engine.require_transfer()
        keys, ids = self.chunk_keys(engine, req)
        try:
            skip = skip_blocks(req.skip_tokens, req.end - req.start, engine.layout.block_size)
        except ValueError as exc:
            raise BadRequestError(str(exc)) from None
        tokens = req.end - req.start - req.skip_tokens
        start = time.perf_counter()
        with _copying(self.metrics, "retrieve"), self._read(req, engine, keys) as chunks:
            for i, src in enumerate(chunks):
                transfer.scatter(src, ids, i, skip)
        record_retrieve(
            self.metrics, tokens, engine.bytes_of(req.end - req.start), start,
            model=engine.model_name, chunks=len(keys),
        )  # fmt: skip
        return RetrieveReply(id=req.id, retrieved_tokens=tokens)

    def retrieve_bytes(self, req: RetrieveBytes) -> tuple[ChunkData, list[bytes]]:
        engine = self.registry.get(req.instance_id)
        keys = self.range_keys(engine, req)
        start = time.perf_counter()
        with _copying(self.metrics, "retrieve"), self._read(req, engine, keys) as chunks:
            # A copy: ZMQ sends after we unpin, and the pages may be reused by then.
            frames = [src.tobytes() for src in chunks]
        nbytes = sum(len(f) for f in frames)
        record_retrieve(
            self.metrics, req.end - req.start, nbytes, start, model=engine.model_name,
            chunks=len(frames),
        )  # fmt: skip
        return ChunkData(id=req.id, chunks=len(frames), chunk_bytes=engine.chunk_bytes), frames

    # ----- the storage steps, through the store ------------------------------------------------

    def _write(
        self, req: Store | StoreBytes, engine: Engine, keys: list[ObjectKey], fill: Fill
    ) -> StoreReply:
        start = time.perf_counter()
        tail = engine.tail_layout(req.end, self.chunk_size)
        with _copying(self.metrics, "store"):
            result = self.store.write(
                keys, engine.chunk_layout, fill, tail=tail, salt=req.cache_salt
            )
        if result.conflicts:
            self._warn_conflict(engine)
        c, t = self.chunk_size, req.end % self.chunk_size
        stored = result.tokens("stored", c, t)
        record_store(
            self.metrics, result, chunks=len(keys), tokens=stored,
            nbytes=engine.bytes_of(stored), started=start, model=engine.model_name,
        )  # fmt: skip
        return StoreReply(
            id=req.id, stored_tokens=stored, cached_tokens=result.tokens("cached", c, t),
            no_space=result.no_space, conflict_tokens=result.tokens("conflicts", c, t),
            keys=list(keys) if req.want_keys else [],
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
        tail = engine.tail_layout(req.end, self.chunk_size)
        tail_tag = None if tail is None else tail.tag
        with self.store.read(keys, engine.layout_tag, owner, what, tail_tag) as chunks:
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
        """Validate a token range (chunk-aligned, or ending in whole engine blocks) and
        return the keys of its chunks."""
        check_identity(engine.model_name, engine.world_size, engine.dtype, req.cache_salt)
        digest = self.keys.digest(engine.namespace(req.cache_salt))
        return self.keys.range_keys(
            digest, req.tokens, req.start, req.end, engine.layout.block_size
        )

    def chunk_sizes(self, engine: Engine, req: ChunkRange, chunks: int) -> list[int]:
        """The byte size of each of a range's ``chunks`` (a partial last one is smaller)."""
        tail = engine.tail_layout(req.end, self.chunk_size)
        sizes = [engine.chunk_bytes] * chunks
        if tail is not None and sizes:
            sizes[-1] = tail.nbytes
        return sizes


def record_store(
    metrics: Metrics, result: WriteResult, *, chunks: int, tokens: int, nbytes: int,
    started: float, model: str, finished: bool = True,
) -> None:  # fmt: skip
    """Log and count a finished store (shared memory, bytes, or a worker's commit) that
    wrote ``tokens`` (``nbytes``); ``finished``: `Metrics.copy_started` counted its start."""
    seconds = time.perf_counter() - started
    if result.stored:
        logger.info("Stored %d tokens in %.3f seconds", tokens, seconds)
    refused = 0
    if result.no_space:
        metrics.store_no_space.inc()
        refused = chunks - result.stored - result.cached - result.conflicts
        logger.warning("L1 is full of locked chunks: stored %d of %d chunks", result.stored, chunks)
    metrics.stored_tokens.inc(tokens)
    metrics.stored_bytes.inc(nbytes)
    metrics.copy_done(
        "store", model, chunks=result.stored, nbytes=nbytes, seconds=seconds,
        no_space_chunks=refused, finished=finished,
    )  # fmt: skip


def record_retrieve(
    metrics: Metrics, tokens: int, nbytes: int, started: float, *, model: str, chunks: int,
    finished: bool = True,
) -> None:  # fmt: skip
    seconds = time.perf_counter() - started
    logger.info("Retrieved %d tokens in %.3f seconds", tokens, seconds)
    metrics.retrieved_tokens.inc(tokens)
    metrics.retrieved_bytes.inc(nbytes)
    metrics.copy_done(
        "retrieve", model, chunks=chunks, nbytes=nbytes, seconds=seconds, finished=finished
    )


@contextmanager
def _copying(metrics: Metrics, kind: str) -> Iterator[None]:
    """Around a copy: its start is counted now; a copy that fails is counted as left
    (upstream's "finished" counts a transfer leaving, not its success). A copy that
    succeeds is counted by `record_store` / `record_retrieve`."""
    metrics.copy_started(kind)
    try:
        yield
    except BaseException:
        metrics.count("finished", (kind,))
        raise


def _check_start_by(req: Store | Retrieve) -> None:
    """Refuse a copy of an engine's blocks that starts after the engine stopped waiting
    (it sat in the worker pool's queue too long): those blocks may hold other KV now."""
    if req.start_by and time.monotonic() > req.start_by:
        late = time.monotonic() - req.start_by
        raise TransferError(
            f"{type(req).__name__.lower()} of request {req.request_id!r} started {late:.2f} s "
            "after the engine stopped waiting for it: nothing was copied (its blocks may hold "
            "other KV by now)"
        )
