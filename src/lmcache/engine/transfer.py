"""Moving whole KV blocks between an engine's memory and L1 chunk buffers.

A chunk buffer has the shape ``[layers, planes, blocks_per_chunk, plane_bytes]``
(uint8): for every layer, the chunk's blocks side by side. Blocks are opaque
bytes; their inner layout (heads, tokens, ISA-specific packing) is the engine's
business, which is why the namespace of a key includes the engine's ``kv_spec``.

    engine memory (one layer, one plane)          chunk buffer (same layer, plane)
    [b0][b1][b2][b3][b4][b5][b6][b7] ...   gather  [b5][b2]
                ^           ^         ───────────>
              id 2        id 5        <───────────  scatter

`BlockCopier` is the one copy routine, over any set of byte arrays: the server's
maps of an engine's segments, an engine worker's own KV memory, and the bench all
call it. The copies run in C (`_blockcopy`) at memory speed (streamed stores, split
over ``copy_threads`` threads with the GIL released), and a SIGBUS raised by the
memory being copied (a peer truncated the segment we mapped) ends the copy
with `TransferError` instead of killing the process. `KVTransfer` is the seam on
the server: `ShmTransfer` maps POSIX shared memory on the same host; CUDA IPC and
bytes-in-the-message implementations plug in beside it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from typing import Protocol, TypeAlias

import numpy as np

from lmcache.defaults import COPY_THREADS
from lmcache.engine import _blockcopy
from lmcache.errors import TransferError
from lmcache.protocol.messages import KVLayout
from lmcache.storage.shm import ShmSegment

logger = logging.getLogger("lmcache.server")

Buffer: TypeAlias = np.ndarray | bytes | bytearray | memoryview  # contiguous bytes


class KVTransfer(Protocol):
    kind: str

    def gather(self, block_ids: np.ndarray, chunk: int, dst: Buffer) -> None:
        """Copy the engine blocks of chunk number ``chunk`` of a range into buffer ``dst``."""

    def scatter(self, src: Buffer, block_ids: np.ndarray, chunk: int, skip_blocks: int) -> None:
        """Copy buffer ``src`` into the engine blocks of chunk number ``chunk`` of a range,
        leaving the range's first ``skip_blocks`` blocks alone."""

    def close(self) -> None: ...


AUTO_COPY_THREADS_MAX = 4  # more rarely helps: a few cores saturate a socket's memory


def resolve_copy_threads(wanted: int = COPY_THREADS) -> int:
    """Threads per copy: ``wanted``, or for 0 (auto) min(4, CPUs this process may use)."""
    if wanted < 0:
        raise ValueError(f"copy_threads must be 0 (auto) or positive, got {wanted}")
    if wanted:
        return wanted
    return max(1, min(AUTO_COPY_THREADS_MAX, len(os.sched_getaffinity(0))))


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
    """Whole-block gathers and scatters, chunk by chunk, over memory described by a `KVLayout`.

    A range of ``n`` chunks comes with ``n * blocks_per_chunk`` block ids (``range_ids``);
    chunk ``i`` holds blocks ``range_ids[i * bpc : (i + 1) * bpc]``. Its buffer is laid out
    ``[layers, planes, bpc, plane_bytes]``, the same on the server, in the worker and in
    the bench, so any of them may fill a chunk that another reads. The last chunk of a
    range may be partial: ``m < bpc`` ids left, a buffer ``[layers, planes, m, plane_bytes]``
    (`piece_sizes`), which must be exactly that big.
    """

    closed = False

    def __init__(
        self,
        layout: KVLayout,
        arrays: list[np.ndarray],
        blocks_per_chunk: int,
        copy_threads: int = COPY_THREADS,
    ) -> None:
        validate_layout(layout, [a.nbytes for a in arrays])
        if blocks_per_chunk <= 0:
            raise ValueError("blocks_per_chunk must be positive")
        if not all(a.flags.writeable and a.flags.c_contiguous for a in arrays):
            raise ValueError("KV memory must be writable, C-contiguous byte arrays")
        self.layout = layout
        self.copy_threads = resolve_copy_threads(copy_threads)
        self.blocks_per_chunk = blocks_per_chunk
        self.plane_bytes = layout.block_bytes // layout.planes
        self.chunk_bytes = layout.num_layers * blocks_per_chunk * layout.block_bytes
        # Raw addresses of each (layer, plane) row for the C routine: `_arrays` keeps the
        # memory behind them mapped for as long as this copier exists (`release` too).
        self._arrays = arrays
        rows = [
            arrays[p.segment].ctypes.data + p.offset + plane * layout.plane_stride
            for p in layout.layers
            for plane in range(layout.planes)
        ]
        self._rows = np.array(rows, dtype=np.uint64)

    def _check_open(self) -> None:
        if self.closed:
            raise TransferError("the engine's KV memory was unregistered during the copy")

    def _copy(
        self,
        ids: np.ndarray,
        buf: Buffer,
        first: int,
        to_engine: bool,
        blocks: int,
        *,
        rows: np.ndarray | None = None,
    ) -> None:
        """Copy ``ids`` between the engine and ``buf``, a chunk of ``blocks`` blocks laid out
        ``[rows, blocks, plane_bytes]``; ``rows``: some (layer, plane) rows, default all."""
        self._check_open()
        rows = self._rows if rows is None else rows
        need = len(rows) * blocks * self.plane_bytes
        have = buf.nbytes if isinstance(buf, np.ndarray | memoryview) else len(buf)
        if have > need:  # a chunk of more blocks: the strides would be wrong (C: too small)
            raise ValueError(f"a chunk of {blocks} blocks takes {need} bytes, not {have}")
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        lay = self.layout
        fault = _blockcopy.copy_blocks(
            rows, ids, lay.num_blocks, lay.block_stride, self.plane_bytes,
            buf, blocks, first, to_engine, self.copy_threads,
        )  # fmt: skip
        if fault:
            self._faulted(fault)

    def _faulted(self, address: int) -> None:
        raise TransferError(
            f"the KV memory shrank under the copy (SIGBUS at {address:#x}): its segment was "
            "truncated or resized after it was registered; register it again"
        )

    def piece_sizes(self, num_ids: int) -> list[int]:
        """The buffer size of each chunk of a range of ``num_ids`` blocks: whole chunks, then
        a partial one if the blocks do not fill the last chunk."""
        whole, tail = divmod(num_ids, self.blocks_per_chunk)
        block_bytes = self.layout.num_layers * self.layout.block_bytes
        return [self.chunk_bytes] * whole + ([tail * block_bytes] if tail else [])

    def gather(self, block_ids: np.ndarray, chunk: int, dst: Buffer) -> None:
        bpc = self.blocks_per_chunk
        ids = block_ids[chunk * bpc : (chunk + 1) * bpc]
        self._copy(ids, dst, 0, False, len(ids))

    def scatter(self, src: Buffer, block_ids: np.ndarray, chunk: int, skip_blocks: int = 0) -> None:
        bpc = self.blocks_per_chunk
        n = min(bpc, len(block_ids) - chunk * bpc)  # a partial last chunk has fewer
        first = max(0, skip_blocks - chunk * bpc)
        if first < n:
            self._copy(block_ids[chunk * bpc + first : chunk * bpc + n], src, first, True, n)

    def scatter_layers(
        self, src: Buffer, block_ids: np.ndarray, chunk: int, skip_blocks: int, layers: range
    ) -> None:
        """`scatter`, for ``layers`` only (a step of ``range(num_layers)``): a chunk buffer
        holds each layer's planes contiguously, so a run of layers is one slice of it.
        Loads pipelined by layer copy layer ``i`` while the engine computes layer ``i - 1``."""
        bpc, planes = self.blocks_per_chunk, self.layout.planes
        n = min(bpc, len(block_ids) - chunk * bpc)
        first = max(0, skip_blocks - chunk * bpc)
        if first >= n or not layers:
            return
        if layers.step != 1 or not 0 <= layers.start < layers.stop <= self.layout.num_layers:
            raise ValueError(f"layers {layers} is not a run of this layout's layers")
        row_bytes = n * self.plane_bytes
        whole = np.frombuffer(src, dtype=np.uint8)
        if whole.nbytes != len(self._rows) * row_bytes:
            raise ValueError(f"a chunk of {n} blocks takes {len(self._rows) * row_bytes} bytes")
        lo, hi = layers.start * planes, layers.stop * planes
        part = whole[lo * row_bytes : hi * row_bytes]
        ids = block_ids[chunk * bpc + first : chunk * bpc + n]
        self._copy(ids, part, first, True, n, rows=self._rows[lo:hi])

    def gather_range(self, block_ids: np.ndarray, chunks: Iterable[tuple[int, Buffer]]) -> None:
        """Gather chunk ``i`` of the range into each ``(i, buffer)``."""
        for i, dst in chunks:
            self.gather(block_ids, i, dst)

    def scatter_range(
        self, block_ids: np.ndarray, chunks: Sequence[Buffer], skip_blocks: int = 0
    ) -> None:
        """Scatter the range's chunks, in order, minus its first ``skip_blocks`` blocks."""
        if len(chunks) != -(-len(block_ids) // self.blocks_per_chunk):
            raise ValueError(
                f"{len(chunks)} chunks for {len(block_ids)} block ids "
                f"({self.blocks_per_chunk} per chunk)"
            )
        for i, src in enumerate(chunks):
            self.scatter(src, block_ids, i, skip_blocks)

    def release(self) -> None:
        """Refuse further copies. The memory stays mapped until the copier is collected, so
        a copy running right now finishes reading valid memory instead of faulting."""
        self.closed = True


def skip_blocks(skip_tokens: int, range_tokens: int, block_size: int) -> int:
    """Blocks at the start of a range that a retrieve leaves alone (ValueError if misaligned)."""
    if skip_tokens < 0 or skip_tokens % block_size or skip_tokens > range_tokens:
        raise ValueError(
            f"skip_tokens={skip_tokens} must be a multiple of the block size ({block_size}) "
            "within the range"
        )
    return skip_tokens // block_size


class ShmTransfer(BlockCopier):
    """Engine KV tensors in POSIX shared memory, mapped by the server (zero-copy path)."""

    kind = "shm"
    faulted = False

    def __init__(
        self,
        layout: KVLayout,
        segments: list[ShmSegment],
        blocks_per_chunk: int,
        copy_threads: int = COPY_THREADS,
    ) -> None:
        super().__init__(layout, [s.array for s in segments], blocks_per_chunk, copy_threads)
        self.segments = segments

    def _faulted(self, address: int) -> None:
        if not self.faulted:  # once per registration: every later copy faults too
            self.faulted = True
            logger.warning(
                "KV segment %s shrank under a copy (SIGBUS caught): its engine truncated or "
                "resized memory it registered; its stores and retrieves fail until it "
                "registers again", ", ".join(s.name for s in self.segments),
            )  # fmt: skip
        super()._faulted(address)

    def close(self) -> None:
        self.release()
        for segment in self.segments:
            segment.close()
