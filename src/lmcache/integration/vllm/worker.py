"""The worker half of the connector: registration, loads and stores.

Transfers run synchronously inside the step that vLLM asks for them (loads in
`start_load_kv`, stores in `wait_for_save`), so no copy is ever in flight when
vLLM frees, preempts or reuses a block: a request's blocks never change under
a copy, and `request_finished` never has to delay freeing them.

    engine_driven   the server maps our KV segments and copies blocks itself
    lmcache_driven  we copy chunks into/out of the server's L1 pool (prepare/commit)
    bytes           the server's memory is out of reach (another host, another
                    /dev/shm): chunk bytes travel in the messages. Chosen
                    automatically when mapping fails either way, and logged once.

A failed load reports its blocks as load errors (vLLM recomputes them); a failed
store is only logged. While the server is down, both are skipped (see `link.py`).
"""

from __future__ import annotations

import logging
import os
from typing import Any, TypedDict

import numpy as np

from lmcache.engine.transfer import BlockCopier
from lmcache.errors import (
    BadRequestError,
    ForbiddenError,
    LMCacheError,
    ServerUnavailableError,
)
from lmcache.integration.vllm.config import TransferMode
from lmcache.integration.vllm.identity import CacheIdentity
from lmcache.integration.vllm.link import ServerLink
from lmcache.integration.vllm.metadata import LoadSpec, Metadata, ParallelStrategy, StoreSpec
from lmcache.protocol.messages import KVMemory, Pong, ShmMemory, WorkerCopy
from lmcache.storage.shm import ShmSegment

logger = logging.getLogger("lmcache.integration")


class _Span(TypedDict):
    request_id: str
    instance_id: int
    tokens: list[int]
    start: int
    end: int
    cache_salt: str


class WorkerSide:
    def __init__(
        self,
        link: ServerLink,
        identity: CacheIdentity,
        parallel: ParallelStrategy,
        mode: TransferMode,
        *,
        can_load: bool,
        can_store: bool,
    ) -> None:
        self.link = link
        self.identity = identity
        self.parallel = parallel
        self.requested_mode = mode
        self.mode: TransferMode = "lmcache_driven" if mode == "auto" else mode
        self.can_load = can_load
        self.can_store = can_store
        self.instance_id = os.getpid()
        self.chunk_size = link.chunk_size
        self._segments: list[ShmSegment] = []
        self._pool: ShmSegment | None = None
        self._copier: BlockCopier | None = None
        self._memory: KVMemory | None = None
        self._view: Any = None
        self.inline = False  # bytes in the messages (no shared memory with the server)
        self._load_errors: set[int] = set()
        link.instance_id = self.instance_id
        link.on_recover = self._register

    # ----- registration -------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        from lmcache.integration.vllm import kv_memory

        logger.info("Registering kv caches!")
        bs = self.identity.block_size
        if self.chunk_size % bs:
            raise ValueError(
                f"The LMCache server's chunk size ({self.chunk_size}) must be a multiple of "
                f"vLLM's block size ({bs}): restart it with --chunk-size {bs * max(1, 256 // bs)}"
            )
        self._view = kv_memory.describe(kv_caches, bs)
        logger.info("Creating transfer context (device_type=cpu, mode=%s)", self.mode)
        if self.mode == "engine_driven":
            self._segments = kv_memory.migrate_to_shm(self._view)
            self._memory = ShmMemory(
                segments=[s.name for s in self._segments],
                tokens=[s.token.hex() for s in self._segments],
            )
        else:
            self._memory = WorkerCopy()
        self._copier = BlockCopier(self._view.layout, self._view.arrays(), self.chunk_size // bs)
        self._register(self.link.pong)
        self.link.start_heartbeat()

    def _register(self, pong: Pong) -> None:
        if self._memory is None:
            return
        if isinstance(self._memory, WorkerCopy):
            self._attach_pool(pong.l1_pool, pong.l1_pool_seal)
        try:
            self._send_registration()
        except (BadRequestError, ForbiddenError) as exc:
            # ForbiddenError: a remote (CurveZMQ) peer may not register shared memory.
            if not isinstance(self._memory, ShmMemory):
                raise
            # The server cannot map our segments: it runs on another host.
            self._go_inline(f"the server cannot map our KV segments: {exc.message}")
            self._memory = WorkerCopy()
            self._send_registration()

    def _send_registration(self) -> None:
        assert self._memory is not None
        self.link.client.register(
            self.instance_id,
            model_name=self.identity.model_name,
            world_size=self.parallel.world_size,
            rank=self.parallel.rank,
            dtype=self.identity.dtype,
            layout=self._view.layout,
            memory=self._memory,
            kv_spec=self.identity.kv_spec,
        )
        logger.info(
            "Registered %d KV layers with the LMCache server at %s as GPU ID %d",
            self._view.layout.num_layers, self.link.endpoint, self.instance_id,
        )  # fmt: skip

    def _attach_pool(self, name: str, seal: str) -> None:
        if not name:  # the server tells its pool only to local peers of its own uid
            self._go_inline("the server did not offer its L1 pool to this connection")
            return
        try:
            token = bytes.fromhex(seal)
        except ValueError:
            token = b""
        if self._pool is not None and self._pool.name == name and self._pool.token == token:
            return
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        try:
            self._pool = ShmSegment.attach(name, token)
            self.inline = False
        except (OSError, ValueError) as exc:
            self._go_inline(f"cannot map the server's L1 pool {name!r}: {exc}")

    def _go_inline(self, why: str) -> None:
        if not self.inline:
            logger.warning(
                "LMCache server at %s shares no memory with this worker (%s): KV bytes will "
                "travel in the messages, which is slower than shared memory",
                self.link.endpoint, why,
            )  # fmt: skip
        self.inline = True

    # ----- loads --------------------------------------------------------------------------

    def start_load(self, meta: Metadata) -> None:
        for spec in meta.loads:
            ok = False
            if self.can_load and self.link.healthy:
                try:
                    self._load(spec)
                    ok = True
                except LMCacheError as exc:
                    logger.warning("load of request %s failed: %s", spec.request_id, exc)
                    if isinstance(exc, ServerUnavailableError):
                        self.link.mark_down(exc)
                except Exception:
                    logger.exception("load of request %s failed", spec.request_id)
            if not ok:
                first = spec.skip_tokens // self.identity.block_size
                self._load_errors.update(spec.block_ids[first:])

    def _load(self, spec: LoadSpec) -> None:
        client = self.link.client
        if self.inline:
            frames = client.retrieve_bytes(**self._span(spec))
            self._scatter_chunks(spec, [np.frombuffer(f, dtype=np.uint8) for f in frames])
            return
        if self.mode == "engine_driven" and isinstance(self._memory, ShmMemory):
            client.retrieve(
                **self._span(spec), block_ids=spec.block_ids, skip_tokens=spec.skip_tokens
            )
            return
        prepared = client.prepare_retrieve(**self._span(spec))
        ok = False
        try:
            pool = self._pool_array()
            chunks = [pool[o : o + prepared.chunk_bytes] for o in prepared.offsets]
            self._scatter_chunks(spec, chunks)
            ok = True
        finally:
            client.commit(self.instance_id, prepared.transfer_id, success=ok)

    # ----- stores -------------------------------------------------------------------------

    def save(self, meta: Metadata) -> None:
        if not (self.can_store and meta.stores and self.link.healthy):
            return
        for spec in meta.stores:
            try:
                self._store(spec)
            except LMCacheError as exc:
                logger.warning("store of request %s skipped: %s", spec.request_id, exc)
                if isinstance(exc, ServerUnavailableError):
                    self.link.mark_down(exc)
                    return
            except Exception:
                logger.exception("store of request %s failed", spec.request_id)

    def _store(self, spec: StoreSpec) -> None:
        client = self.link.client
        if self.inline:
            bufs = [
                np.empty(self._chunk_bytes(), dtype=np.uint8)
                for _ in range(spec.start, spec.end, self.chunk_size)
            ]
            self._gather_chunks(spec, list(enumerate(bufs)))
            client.store_bytes(**self._span(spec), chunks=bufs)
            return
        if self.mode == "engine_driven" and isinstance(self._memory, ShmMemory):
            client.store(**self._span(spec), block_ids=spec.block_ids)
            return
        prepared = client.prepare_store(**self._span(spec))
        ok = False
        try:
            pool = self._pool_array()
            n = prepared.chunk_bytes
            self._gather_chunks(
                spec, [(i, pool[o : o + n]) for i, o in enumerate(prepared.offsets) if o >= 0]
            )
            ok = True
        finally:
            client.commit(self.instance_id, prepared.transfer_id, success=ok)

    # ----- completion ------------------------------------------------------------------------

    def load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def shutdown(self) -> None:
        self.link.close()
        if self._copier is not None:
            self._copier.release()
        if self._pool is not None:
            self._pool.close()
        for segment in self._segments:
            segment.unlink()  # the mapping stays valid for vLLM until the process exits

    # ----- helpers ------------------------------------------------------------------------

    def _span(self, spec: LoadSpec | StoreSpec) -> _Span:
        """The arguments every range request of the client takes."""
        return _Span(
            request_id=spec.request_id, instance_id=self.instance_id, tokens=spec.tokens,
            start=spec.start, end=spec.end, cache_salt=spec.cache_salt,
        )  # fmt: skip

    def _pool_array(self) -> np.ndarray:
        if self._pool is None:
            raise LMCacheError("the server's L1 pool is not mapped")
        return self._pool.array

    def _chunk_bytes(self) -> int:
        assert self._copier is not None
        return self._copier.chunk_bytes

    def _gather_chunks(self, spec: StoreSpec, chunks: list[tuple[int, np.ndarray]]) -> None:
        """Copy the blocks of chunk ``i`` of the range into each ``(i, buffer)``."""
        assert self._copier is not None
        self._copier.gather_range(np.asarray(spec.block_ids, dtype=np.int64), chunks)

    def _scatter_chunks(self, spec: LoadSpec, chunks: list[np.ndarray]) -> None:
        """Copy chunk buffers into the blocks of the range, minus the first skip_tokens."""
        assert self._copier is not None
        if len(chunks) * self.chunk_size != spec.end - spec.start:
            raise LMCacheError(f"expected {(spec.end - spec.start) // self.chunk_size} chunks")
        skip = spec.skip_tokens // self.identity.block_size
        self._copier.scatter_range(np.asarray(spec.block_ids, dtype=np.int64), chunks, skip)
