"""vLLM's KV tensors as the server sees them: a `KVLayout` over shared storages.

On vLLM's CPU backend every layer's tensor is ``[num_blocks, kv_heads, block_size,
2 * head_size]`` and all layers are views of one storage. A block's inner layout
depends on the CPU's ISA, so a block is copied as opaque bytes: one block of one
layer is ``block_bytes`` contiguous bytes at ``offset + block_id * block_stride``.

`migrate_to_shm` (engine_driven mode) moves each storage into a POSIX shared-memory
segment ``/lmcache_kv_<pid>_<idx>`` (mode 0600) and re-points the *same* tensor
objects at it, so vLLM keeps using them and the server maps the very same pages.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from lmcache.engine.segment_guard import guard_segments
from lmcache.engine.shm_kv import create_kv_segment
from lmcache.protocol.messages import KVLayout, LayerPlacement
from lmcache.storage.shm import ShmSegment

logger = logging.getLogger("lmcache.integration")


@dataclass
class KVMemoryView:
    layout: KVLayout
    storages: list[torch.UntypedStorage]
    tensors: list[torch.Tensor]

    def arrays(self) -> list[np.ndarray]:
        """uint8 numpy views of the storages (no copy)."""
        out = []
        for storage in self.storages:
            flat = torch.empty(0, dtype=torch.uint8).set_(storage)
            out.append(flat.numpy())
        return out


def describe(kv_caches: dict[str, torch.Tensor], block_size: int) -> KVMemoryView:
    tensors = list(kv_caches.values())
    if not tensors:
        raise ValueError("vLLM registered no KV cache tensors")
    if any(t.device.type != "cpu" for t in tensors):
        raise NotImplementedError(
            "KV caches on a GPU need the CUDA IPC transfer, which this version does not have "
            "yet; run vLLM's CPU backend"
        )
    storages: list[torch.UntypedStorage] = []
    by_ptr: dict[int, int] = {}
    placements = []
    geometry = set()
    for t in tensors:
        storage = t.untyped_storage()
        index = by_ptr.setdefault(storage.data_ptr(), len(storages))
        if index == len(storages):
            storages.append(storage)
        elt = t.element_size()
        if not t[0].is_contiguous():
            raise ValueError(f"KV tensor blocks are not contiguous (stride {t.stride()})")
        geometry.add((t.shape[0], math.prod(t.shape[1:]) * elt, t.stride(0) * elt))
        placements.append(LayerPlacement(index, t.storage_offset() * elt))
    if len(geometry) != 1:
        raise ValueError(f"KV layers differ in geometry: {sorted(geometry)}")
    num_blocks, block_bytes, block_stride = geometry.pop()
    layout = KVLayout(
        num_layers=len(tensors),
        num_blocks=num_blocks,
        block_size=block_size,
        block_bytes=block_bytes,
        block_stride=block_stride,
        layers=placements,
    )
    return KVMemoryView(layout, storages, tensors)


def migrate_to_shm(view: KVMemoryView) -> list[ShmSegment]:
    """Move every storage into a new shared-memory segment, keeping the tensor objects."""
    segments = []
    new_storages = []
    for storage in view.storages:
        segment = create_kv_segment(storage.nbytes())
        old = torch.empty(0, dtype=torch.uint8).set_(storage).numpy()
        np.copyto(segment.array, old)
        shared = torch.from_numpy(segment.array).untyped_storage()
        for t in view.tensors:
            if t.untyped_storage().data_ptr() == storage.data_ptr():
                t.set_(shared, t.storage_offset(), t.size(), t.stride())
        new_storages.append(shared)
        segments.append(segment)
        logger.info(
            "Migrated CPU KV cache tensor (nbytes=%d) to SHM %s", storage.nbytes(), segment.name
        )
    view.storages = new_storages
    # vLLM's default shutdown SIGKILLs this worker: the guard then removes the segments.
    guard_segments([(segment.name, segment.fd) for segment in segments])
    return segments


def segments_of(view: KVMemoryView, segments: list[ShmSegment]) -> list[ShmSegment]:
    """The segments (of `migrate_to_shm` over a larger view) that hold ``view``'s storages,
    in its order; none without segments (not engine_driven)."""
    if not segments:
        return []
    by_ptr = {int(s.array.ctypes.data): s for s in segments}
    out = []
    for storage in view.storages:
        segment = by_ptr.get(storage.data_ptr())
        if segment is None:
            raise ValueError("a KV tensor is not in the shared-memory segments")
        out.append(segment)
    return out
