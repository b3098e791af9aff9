"""A worker's registration with the server, and the `TransferPath` it gives the worker.

Its own module because the path is decided here and only here, at every registration
(the first, and each one after a server restart: `link.on_recover`), while loads and
stores (`worker.py`) just use whatever path is current:

    mode            preferred path    bytes in the messages (`BytesPath`) instead when
    engine_driven   SharedKVPath      the server refuses to map our KV segments
    lmcache_driven  PoolPath          the server offers no L1 pool, or we cannot map it

Either fallback means the server's memory is out of reach (another host, another
/dev/shm); it is logged once, when the path becomes bytes, and a later registration
tries the preferred path again. The registration also owns what the paths copy through
(the `BlockCopier` over vLLM's KV memory, and the worker's KV segments) until shutdown.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from lmcache.engine.transfer import BlockCopier
from lmcache.errors import BadRequestError, ForbiddenError
from lmcache.integration.vllm.config import TransferMode
from lmcache.integration.vllm.identity import CacheIdentity
from lmcache.integration.vllm.link import ServerLink
from lmcache.integration.vllm.metadata import ParallelStrategy
from lmcache.integration.vllm.transfer_paths import (
    BytesPath,
    NoSharedMemory,
    PoolPath,
    SharedKVPath,
    TransferPath,
)
from lmcache.protocol.messages import KVLayout, Pong
from lmcache.storage.shm import ShmSegment

logger = logging.getLogger("lmcache.integration")


def check_chunk_size(chunk_size: int, block_size: int) -> None:
    """The server's chunks must be whole vLLM blocks; say how to restart it if not."""
    if chunk_size % block_size:
        raise ValueError(
            f"The LMCache server's chunk size ({chunk_size}) must be a multiple of vLLM's "
            f"block size ({block_size}): restart it with "
            f"--chunk-size {block_size * max(1, 256 // block_size)}"
        )


class Registration:
    def __init__(
        self,
        link: ServerLink,
        identity: CacheIdentity,
        parallel: ParallelStrategy,
        mode: TransferMode,
        *,
        instance_id: int,
        chunk_size: int,
    ) -> None:
        """``mode``: engine_driven or lmcache_driven (`auto` resolved by the caller);
        ``chunk_size``: the server's, as the worker first saw it."""
        self.link = link
        self.identity = identity
        self.parallel = parallel
        self.mode = mode
        self.instance_id = instance_id
        self.chunk_size = chunk_size
        self.path: TransferPath | None = None  # None until registered
        self.layout: KVLayout | None = None
        self._copier: BlockCopier | None = None
        self._segments: list[ShmSegment] = []

    def register_memory(
        self,
        layout: KVLayout,
        arrays: list[np.ndarray],
        segments: Sequence[ShmSegment],
        copy_threads: int,
    ) -> None:
        """Register ``arrays`` (in ``segments`` for engine_driven) and start the heartbeat."""
        if self.mode == "engine_driven" and not segments:
            raise ValueError("engine_driven needs the KV memory in shared-memory segments")
        check_chunk_size(self.chunk_size, layout.block_size)
        self.layout = layout
        self._segments = list(segments)
        self._copier = BlockCopier(
            layout, arrays, self.chunk_size // layout.block_size, copy_threads
        )
        self.register(self.link.pong)
        self.link.start_heartbeat()

    def register(self, pong: Pong) -> None:
        """Register with the path this mode prefers, or with bytes where the server's
        memory is out of reach; then use that path. Also the link's `on_recover`."""
        if self._copier is None:
            return
        try:
            path = self._registered(self._preferred_path(pong))
        except NoSharedMemory as exc:
            path = self._registered(BytesPath(self.link.client, self.instance_id, self._copier))
            if not (self.path is not None and self.path.uses_bytes):
                logger.warning(
                    "LMCache server at %s shares no memory with this worker (%s): KV bytes "
                    "will travel in the messages, which is slower than shared memory",
                    self.link.endpoint, exc,
                )  # fmt: skip
        old, self.path = self.path, path
        if old is not None and old is not path:
            old.close()
            if old.uses_bytes and not path.uses_bytes:
                logger.info("KV bytes move through %s again", path.name)

    def _preferred_path(self, pong: Pong) -> TransferPath:
        """The shared-memory path of this mode; `NoSharedMemory` if we cannot map the pool."""
        assert self._copier is not None
        client, iid = self.link.client, self.instance_id
        if self.mode == "engine_driven":
            return SharedKVPath(client, iid, self._copier, self._segments)
        if isinstance(self.path, PoolPath) and self.path.serves(pong):
            return self.path  # the same server's pool: keep our mapping
        return PoolPath.attach(client, iid, self._copier, pong)

    def _registered(self, path: TransferPath) -> TransferPath:
        """``path``, once the server accepted the memory it announces; closed if not."""
        assert self.layout is not None
        ok = False
        try:
            self.link.client.register(
                self.instance_id,
                model_name=self.identity.model_name,
                world_size=self.parallel.world_size,
                rank=self.parallel.rank,
                dtype=self.identity.dtype,
                layout=self.layout,
                memory=path.memory,
                kv_spec=self.identity.kv_spec,
            )
            ok = True
        except (BadRequestError, ForbiddenError) as exc:
            # The server cannot map our segments (it runs on another host, or sees another
            # /dev/shm); ForbiddenError: a remote (CurveZMQ) peer may not register them.
            if isinstance(path, SharedKVPath):
                raise NoSharedMemory(
                    f"the server cannot map our KV segments: {exc.message}"
                ) from None
            raise
        finally:
            if not ok and path is not self.path:
                path.close()
        logger.info(
            "Registered %d KV layers with the LMCache server at %s as GPU ID %d",
            self.layout.num_layers, self.link.endpoint, self.instance_id,
        )  # fmt: skip
        return path

    def unlink_segments(self) -> None:
        """Remove our KV segments' names (idempotent). The mappings stay valid, for vLLM and
        for a server that has them mapped, until the processes exit; only a later
        registration needs the names, and there is none once vLLM shuts down."""
        for segment in self._segments:
            segment.unlink()

    def close(self) -> None:
        """After the link: close the path, free the copier, unlink our KV segments."""
        if self.path is not None:
            self.path.close()
        if self._copier is not None:
            self._copier.release()
        self.unlink_segments()
