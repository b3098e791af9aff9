"""Moving whole KV blocks between an engine's memory and L1 chunk buffers.

A chunk buffer has the shape ``[layers, planes, blocks_per_chunk, plane_bytes]``
(uint8): for every layer, the chunk's blocks side by side. Blocks are opaque
bytes; their inner layout (heads, tokens, ISA-specific packing) is the engine's
business, which is why the namespace of a key includes the engine's ``kv_spec``.

    engine memory (one layer, one plane)          chunk buffer (same layer, plane)
    [b0][b1][b2][b3][b4][b5][b6][b7] ...   gather  [b5][b2]
                ^           ^         ───────────>
              id 2        id 5        <───────────  scatter

`BlockCopier` does the copies over any set of byte arrays (the server's maps of
an engine's segments, or an engine worker's own KV memory). `KVTransfer` is the
seam on the server: `ShmTransfer` maps POSIX shared memory on the same host;
CUDA IPC and bytes-in-the-message implementations plug in beside it.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
from numpy.lib.stride_tricks import as_strided

from lmcache.errors import TransferError
from lmcache.protocol.messages import KVLayout
from lmcache.storage.shm import ShmSegment


class KVTransfer(Protocol):
    kind: str

    def gather(self, block_ids: np.ndarray, dst: np.ndarray) -> None:
        """Copy engine blocks ``block_ids`` into chunk buffer ``dst``."""

    def scatter(self, src: np.ndarray, block_ids: np.ndarray) -> None:
        """Copy chunk buffer ``src`` into engine blocks ``block_ids``."""

    def close(self) -> None: ...


def validate_layout(layout: KVLayout, segment_sizes: list[int]) -> None:
    """Raise ValueError unless every block of every layer lies inside its segment."""
    positive = ("num_layers", "num_blocks", "block_size", "block_bytes", "block_stride", "planes")
    for name in positive:
        if getattr(layout, name) <= 0:
            raise ValueError(f"layout.{name} must be positive")
    if len(layout.layers) != layout.num_layers:
        raise ValueError(
            f"layout.layers has {len(layout.layers)} entries for {layout.num_layers} layers"
        )
    if layout.block_bytes % layout.planes:
        raise ValueError("layout.block_bytes must divide evenly into planes")
    if layout.planes > 1 and layout.plane_stride <= 0:
        raise ValueError("layout.plane_stride must be positive when planes > 1")
    plane_bytes = layout.block_bytes // layout.planes
    span = (
        (layout.planes - 1) * layout.plane_stride
        + (layout.num_blocks - 1) * layout.block_stride
        + plane_bytes
    )
    for i, layer in enumerate(layout.layers):
        if not 0 <= layer.segment < len(segment_sizes):
            raise ValueError(f"layer {i} names segment {layer.segment}, which was not given")
        if layer.offset < 0 or layer.offset + span > segment_sizes[layer.segment]:
            raise ValueError(
                f"layer {i} spans bytes {layer.offset}..{layer.offset + span} but its segment "
                f"has {segment_sizes[layer.segment]} bytes"
            )


class BlockCopier:
    """Whole-block gathers and scatters over byte arrays described by a `KVLayout`."""

    def __init__(self, layout: KVLayout, arrays: list[np.ndarray]) -> None:
        validate_layout(layout, [a.nbytes for a in arrays])
        self.layout = layout
        pb = layout.block_bytes // layout.planes
        shape = (layout.planes, layout.num_blocks, pb)
        strides = (layout.plane_stride, layout.block_stride, 1)
        self._layers = [
            as_strided(arrays[p.segment][p.offset :], shape=shape, strides=strides)
            for p in layout.layers
        ]
        # One view over all layers when they are evenly spaced in one segment: then a
        # gather is a single np.take, whatever the number of layers.
        self._all: np.ndarray | None = None
        first = layout.layers[0]
        step = layout.layers[1].offset - first.offset if layout.num_layers > 1 else 0
        if all(
            p.segment == first.segment and p.offset == first.offset + i * step
            for i, p in enumerate(layout.layers)
        ) and (step > 0 or layout.num_layers == 1):
            self._all = as_strided(
                arrays[first.segment][first.offset :],
                shape=(layout.num_layers, *shape),
                strides=(step, *strides),
            )

    closed = False

    def _check_open(self) -> None:
        if self.closed:
            raise TransferError("the engine's KV memory was unregistered during the copy")

    def gather(self, block_ids: np.ndarray, dst: np.ndarray) -> None:
        self._check_open()
        # np.take copies straight into `dst`, but only reads a C-contiguous source
        # without first copying it whole; other views use fancy indexing per layer.
        if self._all is not None and self._all.flags.c_contiguous:
            np.take(self._all, block_ids, axis=2, out=dst, mode="clip")
            return
        for layer, view in enumerate(self._layers):
            if view.flags.c_contiguous:
                np.take(view, block_ids, axis=1, out=dst[layer], mode="clip")
            else:
                dst[layer] = view[:, block_ids]

    def scatter(self, src: np.ndarray, block_ids: np.ndarray) -> None:
        self._check_open()
        if self._all is not None:
            self._all[:, :, block_ids] = src
            return
        for layer, view in enumerate(self._layers):
            view[:, block_ids] = src[layer]

    def release(self) -> None:
        """Refuse further copies. The views stay: a copy running right now keeps reading
        mapped memory (numpy holds the mapping) instead of silently copying nothing."""
        self.closed = True


class ShmTransfer(BlockCopier):
    """Engine KV tensors in POSIX shared memory, mapped by the server (zero-copy path)."""

    kind = "shm"

    def __init__(self, layout: KVLayout, segments: list[ShmSegment]) -> None:
        super().__init__(layout, [s.array for s in segments])
        self.segments = segments

    def close(self) -> None:
        self.release()
        for segment in self.segments:
            segment.close()
