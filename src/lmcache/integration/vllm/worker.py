"""The worker half of the connector: registration, loads and stores.

Transfers run synchronously inside the step that vLLM asks for them (loads in
`start_load_kv`, stores in `wait_for_save`), so no copy is ever in flight when
vLLM frees, preempts or reuses a block: a request's blocks never change under
a copy, and `request_finished` never has to delay freeing them.

    engine_driven   the server maps our KV segments and copies blocks itself
    lmcache_driven  we copy chunks into/out of the server's L1 pool (prepare/commit)

A failed load reports its blocks as load errors (vLLM recomputes them); a failed
store is only logged. While the server is down, both are skipped (see `link.py`).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from lmcache.engine.transfer import BlockCopier
from lmcache.errors import LMCacheError
from lmcache.integration.vllm.config import TransferMode
from lmcache.integration.vllm.identity import CacheIdentity
from lmcache.integration.vllm.link import ServerLink
from lmcache.integration.vllm.metadata import LoadSpec, Metadata, ParallelStrategy, StoreSpec
from lmcache.protocol.messages import KVMemory, Pong, ShmMemory, WorkerCopy
from lmcache.storage.shm import ShmSegment

logger = logging.getLogger("lmcache.integration")


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
        self._finished_loads: set[str] = set()
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
            self._copier = BlockCopier(self._view.layout, self._view.arrays())
        self._register(self.link.pong)
        self.link.start_heartbeat()

    def _register(self, pong: Pong) -> None:
        if self._memory is None:
            return
        if isinstance(self._memory, WorkerCopy):
            self._attach_pool(pong.l1_pool, bytes.fromhex(pong.server_token))
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

    def _attach_pool(self, name: str, token: bytes) -> None:
        if self._pool is not None and self._pool.name == name:
            return
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        try:
            self._pool = ShmSegment.attach(name, token)
        except (OSError, ValueError) as exc:
            raise LMCacheError(
                f"cannot map the server's L1 pool {name!r} ({exc}); lmcache_driven needs the "
                "server on this host (use engine_driven or run the server here)"
            ) from exc

    # ----- loads --------------------------------------------------------------------------

    def start_load(self, meta: Metadata) -> None:
        for spec in meta.loads:
            self._finished_loads.add(spec.request_id)
            ok = False
            if self.can_load and self.link.healthy:
                try:
                    self._load(spec)
                    ok = True
                except LMCacheError as exc:
                    logger.warning("load of request %s failed: %s", spec.request_id, exc)
                    if type(exc).__name__ == "ServerUnavailableError":
                        self.link.mark_down(exc)
                except Exception:
                    logger.exception("load of request %s failed", spec.request_id)
            if not ok:
                first = spec.skip_tokens // self.identity.block_size
                self._load_errors.update(spec.block_ids[first:])

    def _load(self, spec: LoadSpec) -> None:
        client = self.link.client
        if self.mode == "engine_driven":
            client.retrieve(
                spec.request_id, self.instance_id, spec.tokens, start=spec.start, end=spec.end,
                block_ids=spec.block_ids, skip_tokens=spec.skip_tokens, cache_salt=spec.cache_salt,
            )  # fmt: skip
            return
        prepared = client.prepare_retrieve(
            spec.request_id, self.instance_id, spec.tokens, start=spec.start, end=spec.end,
            cache_salt=spec.cache_salt,
        )  # fmt: skip
        ok = False
        try:
            ids = np.asarray(spec.block_ids, dtype=np.intp)
            bpc = self.chunk_size // self.identity.block_size
            skip = spec.skip_tokens // self.identity.block_size
            for i, offset in enumerate(prepared.offsets):
                first = max(0, skip - i * bpc)
                if first < bpc:
                    src = self._chunk(offset, prepared.chunk_bytes)
                    self._copier_or_fail().scatter(
                        src[:, :, first:], ids[i * bpc + first : (i + 1) * bpc]
                    )
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
                if type(exc).__name__ == "ServerUnavailableError":
                    self.link.mark_down(exc)
                    return
            except Exception:
                logger.exception("store of request %s failed", spec.request_id)

    def _store(self, spec: StoreSpec) -> None:
        client = self.link.client
        if self.mode == "engine_driven":
            client.store(
                spec.request_id, self.instance_id, spec.tokens, start=spec.start, end=spec.end,
                block_ids=spec.block_ids, cache_salt=spec.cache_salt,
            )  # fmt: skip
            return
        prepared = client.prepare_store(
            spec.request_id, self.instance_id, spec.tokens, start=spec.start, end=spec.end,
            cache_salt=spec.cache_salt,
        )  # fmt: skip
        ok = False
        try:
            ids = np.asarray(spec.block_ids, dtype=np.intp)
            bpc = self.chunk_size // self.identity.block_size
            for i, offset in enumerate(prepared.offsets):
                if offset >= 0:
                    dst = self._chunk(offset, prepared.chunk_bytes)
                    self._copier_or_fail().gather(ids[i * bpc : (i + 1) * bpc], dst)
            ok = True
        finally:
            client.commit(self.instance_id, prepared.transfer_id, success=ok)

    # ----- completion ------------------------------------------------------------------------

    def finished_loads(self) -> set[str]:
        done, self._finished_loads = self._finished_loads, set()
        return done

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

    def _chunk(self, offset: int, nbytes: int) -> np.ndarray:
        if self._pool is None:
            raise LMCacheError("the server's L1 pool is not mapped")
        lay = self._view.layout
        bpc = self.chunk_size // self.identity.block_size
        return self._pool.array[offset : offset + nbytes].reshape(lay.num_layers, 1, bpc, -1)

    def _copier_or_fail(self) -> BlockCopier:
        if self._copier is None:
            raise LMCacheError("no block copier (engine_driven mode)")
        return self._copier
