"""Registered engine workers: one entry per KV-cache rank (instance id)."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lmcache.engine.transfer import KVTransfer, ShmTransfer
from lmcache.errors import BadRequestError, UnknownEngineError
from lmcache.protocol.messages import KVLayout, KVMemory, RegisterKV, ShmMemory
from lmcache.storage.keys import MAX_SALT_LEN, Namespace
from lmcache.storage.shm import ShmSegment

logger = logging.getLogger(__name__)

MAX_WORLD_SIZE = 4096
MAX_NAME_LEN = 512


@dataclass(eq=False)
class Engine:
    """One registered worker and what the server needs to copy its blocks."""

    instance_id: int
    model_name: str
    world_size: int
    rank: int
    dtype: str
    kv_spec: str
    layout: KVLayout
    transfer: KVTransfer | None  # None: the worker copies itself (prepare/commit)
    blocks_per_chunk: int
    registered_at: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.monotonic)
    _digests: dict[str, bytes] = field(default_factory=dict, repr=False)

    @property
    def chunk_shape(self) -> tuple[int, int, int, int]:
        lay = self.layout
        return (lay.num_layers, lay.planes, self.blocks_per_chunk, lay.block_bytes // lay.planes)

    @property
    def chunk_bytes(self) -> int:
        return self.layout.num_layers * self.blocks_per_chunk * self.layout.block_bytes

    @property
    def layout_tag(self) -> bytes:
        """Identifies the byte layout of this engine's chunks (see `L1Cache` tags)."""
        return repr(self.chunk_shape).encode()

    def namespace_digest(self, cache_salt: str) -> bytes:
        digest = self._digests.get(cache_salt)
        if digest is None:
            ns = Namespace(
                self.model_name, self.world_size, self.rank, self.dtype, self.kv_spec, cache_salt
            )
            digest = self._digests.setdefault(cache_salt, ns.digest)
            if len(self._digests) > 1024:  # many tenants: keep the memo bounded
                self._digests.clear()
        return digest

    def require_transfer(self) -> KVTransfer:
        if self.transfer is None:
            raise BadRequestError(
                f"GPU ID {self.instance_id} shares no memory with the server (lmcache_driven): "
                "use prepare_store / prepare_retrieve"
            )
        return self.transfer

    def check_block_ids(self, block_ids: list[int], expected: int) -> np.ndarray:
        if len(block_ids) != expected:
            raise BadRequestError(
                f"expected {expected} block ids for the token range, got {len(block_ids)}"
            )
        ids = np.asarray(block_ids, dtype=np.intp)
        if ids.size and (ids.min() < 0 or ids.max() >= self.layout.num_blocks):
            raise BadRequestError(
                f"block id out of range 0..{self.layout.num_blocks - 1} "
                f"(got {int(ids.min())}..{int(ids.max())})"
            )
        return ids

    def describe(self) -> dict[str, Any]:
        lay = self.layout
        return {
            "instance_id": self.instance_id,
            "model_name": self.model_name,
            "world_size": self.world_size,
            "rank": self.rank,
            "dtype": self.dtype,
            "kv_spec": self.kv_spec,
            "transfer": self.transfer.kind if self.transfer else "worker_copy",
            "num_layers": lay.num_layers,
            "num_blocks": lay.num_blocks,
            "block_size": lay.block_size,
            "block_bytes": lay.block_bytes,
            "planes": lay.planes,
            "chunk_bytes": self.chunk_bytes,
            "registered_at": self.registered_at,
            "idle_s": round(time.monotonic() - self.last_seen, 3),
        }


def check_identity(model_name: str, world_size: int, dtype: str, cache_salt: str = "") -> None:
    """Validate the fields that go into a namespace."""
    if not model_name or len(model_name) > MAX_NAME_LEN:
        raise BadRequestError(f"model_name must have 1..{MAX_NAME_LEN} characters")
    if not 1 <= world_size <= MAX_WORLD_SIZE:
        raise BadRequestError(f"world_size must be in 1..{MAX_WORLD_SIZE}, got {world_size}")
    if not dtype or len(dtype) > 64:
        raise BadRequestError("dtype must have 1..64 characters")
    if len(cache_salt) > MAX_SALT_LEN:
        raise BadRequestError(f"cache_salt longer than {MAX_SALT_LEN} characters")


class EngineRegistry:
    def __init__(self, chunk_size: int, max_chunk_bytes: int = 1 << 62) -> None:
        self.chunk_size = chunk_size
        self.max_chunk_bytes = max_chunk_bytes
        self._engines: dict[int, Engine] = {}
        self._lock = threading.Lock()

    def register(self, msg: RegisterKV) -> Engine:
        check_identity(msg.model_name, msg.world_size, msg.dtype)
        if not 0 <= msg.rank < msg.world_size:
            raise BadRequestError(f"rank {msg.rank} outside world_size {msg.world_size}")
        lay = msg.layout
        if lay.block_size <= 0 or self.chunk_size % lay.block_size:
            raise BadRequestError(
                f"the server's chunk size ({self.chunk_size} tokens) must be a multiple of the "
                f"engine's block size ({lay.block_size}); restart the server with a matching "
                "--chunk-size"
            )
        if (
            lay.num_layers * (self.chunk_size // lay.block_size) * lay.block_bytes
            > self.max_chunk_bytes
        ):
            raise BadRequestError(
                f"one {self.chunk_size}-token chunk of this layout is larger than the L1 pool "
                f"({self.max_chunk_bytes} bytes)"
            )
        transfer = self._open(msg.memory, lay)
        engine = Engine(
            instance_id=msg.instance_id,
            model_name=msg.model_name,
            world_size=msg.world_size,
            rank=msg.rank,
            dtype=msg.dtype,
            kv_spec=msg.kv_spec,
            layout=lay,
            transfer=transfer,
            blocks_per_chunk=self.chunk_size // lay.block_size,
        )
        with self._lock:
            old = self._engines.pop(msg.instance_id, None)
            self._engines[msg.instance_id] = engine
        if old is not None and old.transfer is not None:
            old.transfer.close()
        return engine

    @staticmethod
    def _open(memory: KVMemory, layout: KVLayout) -> KVTransfer | None:
        if not isinstance(memory, ShmMemory):
            if layout.num_layers <= 0 or layout.block_bytes <= 0 or layout.planes <= 0:
                raise BadRequestError("layout needs positive num_layers, block_bytes and planes")
            if layout.block_bytes % layout.planes:
                raise BadRequestError("layout.block_bytes must divide evenly into planes")
            return None
        if not memory.segments or len(memory.segments) > 4096:
            raise BadRequestError("memory.segments must list 1..4096 segment names")
        if len(memory.tokens) != len(memory.segments):
            raise BadRequestError("memory.tokens must hold one seal per segment")
        segments: list[ShmSegment] = []
        try:
            for name, token in zip(memory.segments, memory.tokens, strict=True):
                try:
                    seal = bytes.fromhex(token)
                except ValueError:
                    raise BadRequestError(f"seal of segment {name!r} is not hex") from None
                try:
                    segments.append(ShmSegment.attach(name, seal))
                except FileNotFoundError:
                    raise BadRequestError(
                        f"shared-memory segment {name!r} does not exist"
                    ) from None
                except (ValueError, OSError) as exc:
                    raise BadRequestError(f"cannot map segment {name!r}: {exc}") from None
            try:
                return ShmTransfer(layout, segments)
            except ValueError as exc:
                raise BadRequestError(f"invalid KV layout: {exc}") from None
        except BaseException:
            for segment in segments:
                segment.close()
            raise

    def unregister(self, instance_id: int) -> bool:
        with self._lock:
            engine = self._engines.pop(instance_id, None)
        if engine is None:
            return False
        if engine.transfer is not None:
            engine.transfer.close()
        return True

    def get(self, instance_id: int) -> Engine:
        engine = self._engines.get(instance_id)
        if engine is None:
            raise UnknownEngineError(
                f"no KV cache registered for GPU ID {instance_id} (register it again; "
                "the server may have restarted)"
            )
        engine.last_seen = time.monotonic()
        return engine

    def touch(self, instance_id: int | None) -> bool:
        engine = self._engines.get(instance_id) if instance_id is not None else None
        if engine is not None:
            engine.last_seen = time.monotonic()
        return engine is not None

    def reap(self, idle_s: float) -> list[int]:
        """Unregister engines not heard from for ``idle_s`` seconds."""
        now = time.monotonic()
        stale = [e.instance_id for e in list(self._engines.values()) if now - e.last_seen > idle_s]
        return [i for i in stale if self.unregister(i)]

    def find(
        self, model_name: str, world_size: int, dtype: str, kv_spec: str
    ) -> list[Engine] | None:
        """One registered engine per rank of this model identity, or None if a rank is missing."""
        by_rank: dict[int, Engine] = {}
        for e in self.engines():
            if (e.model_name, e.world_size, e.dtype, e.kv_spec) == (
                model_name,
                world_size,
                dtype,
                kv_spec,
            ):
                by_rank.setdefault(e.rank, e)
        if len(by_rank) != world_size:
            return None
        return [by_rank[r] for r in range(world_size)]

    def engines(self) -> list[Engine]:
        with self._lock:
            return list(self._engines.values())

    def close(self) -> None:
        for engine in self.engines():
            self.unregister(engine.instance_id)
