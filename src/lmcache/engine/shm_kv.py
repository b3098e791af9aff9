"""Engine side of the shared-memory path: a paged KV cache in POSIX shared memory.

An engine worker (the vLLM connector in ``engine_driven`` mode, the benchmark's
synthetic engine, the tests) puts its KV blocks in segments named
``/lmcache_kv_<pid>_<idx>`` (mode 0600) and registers their names; the server
copies blocks itself, through the file (see `lmcache.engine.transfer.ShmTransfer`).
The segment is unlinked when the cache is closed, so nothing outlives the worker; while
it exists, this process holds its lock, which is what tells a sweep that it is live
(see `lmcache.storage.shm_names`).

Layout of one segment, ``layers`` evenly spaced (the common dense case)::

    [ layer 0: plane 0 blocks 0..N-1 | plane 1 ... ][ layer 1 ... ] ...
"""

from __future__ import annotations

import itertools
import os

import numpy as np

from lmcache.protocol.messages import KVLayout, LayerPlacement, ShmMemory
from lmcache.storage.shm import SegmentExistsError, ShmSegment

_indexes = itertools.count()
_NAME_ATTEMPTS = 1000


def kv_segment_name(pid: int | None = None) -> str:
    return f"/lmcache_kv_{os.getpid() if pid is None else pid}_{next(_indexes)}"


def create_kv_segment(size: int) -> ShmSegment:
    """A new segment ``/lmcache_kv_<pid>_<idx>`` of ``size`` bytes.

    An index that a live segment already has is skipped: a process of another PID
    namespace sharing /dev/shm can have our pid. (A stale one is replaced.) The name
    keeps the form that the server accepts for registration.
    """
    for _ in range(_NAME_ATTEMPTS):
        try:
            return ShmSegment.create(kv_segment_name(), size, exact=True)
        except SegmentExistsError:
            continue
    raise SegmentExistsError(
        f"{_NAME_ATTEMPTS} KV segment names of pid {os.getpid()} in a row are in use by live "
        "processes"
    )


class ShmKVCache:
    """``blocks[layer, plane, block]`` is one block of one plane as ``plane_bytes`` bytes."""

    def __init__(
        self,
        *,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        block_bytes: int,
        planes: int = 2,
    ) -> None:
        if block_bytes % planes:
            raise ValueError("block_bytes must divide evenly into planes")
        plane_bytes = block_bytes // planes
        layer_bytes = block_bytes * num_blocks
        self.segment = create_kv_segment(layer_bytes * num_layers)
        self.blocks = self.segment.array.reshape(num_layers, planes, num_blocks, plane_bytes)
        self.layout = KVLayout(
            num_layers=num_layers,
            num_blocks=num_blocks,
            block_size=block_size,
            block_bytes=block_bytes,
            block_stride=plane_bytes,
            layers=[LayerPlacement(0, i * layer_bytes) for i in range(num_layers)],
            planes=planes,
            plane_stride=num_blocks * plane_bytes,
        )
        self.memory = ShmMemory(segments=[self.segment.name], tokens=[self.segment.token.hex()])

    def close(self) -> None:
        self.blocks = np.empty((0, 0, 0, 0), dtype=np.uint8)
        self.segment.close()
        self.segment.unlink()
