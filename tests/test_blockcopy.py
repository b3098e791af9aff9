"""The one copy routine (`BlockCopier` over the C `_blockcopy`): bytes, bounds and SIGBUS.

Correctness is checked against plain numpy indexing of the same layout; the SIGBUS tests
truncate a file this test created under a mapping this test made.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmcache.engine import _blockcopy
from lmcache.engine.transfer import BlockCopier, skip_blocks
from lmcache.errors import TransferError
from lmcache.protocol.messages import KVLayout, LayerPlacement


def layout_of(  # noqa: PLR0917
    layers: int, planes: int, blocks: int, pb: int, gap: int, segments: int
) -> tuple[KVLayout, list[int]]:
    """Layers spread round-robin over ``segments``; ``gap`` spare bytes between blocks."""
    stride = pb + gap
    plane_stride = blocks * stride
    layer_bytes = planes * plane_stride
    per_segment = [0] * segments
    placements = []
    for i in range(layers):
        seg = i % segments
        placements.append(LayerPlacement(seg, per_segment[seg]))
        per_segment[seg] += layer_bytes
    lay = KVLayout(
        num_layers=layers, num_blocks=blocks, block_size=16, block_bytes=planes * pb,
        block_stride=stride, layers=placements, planes=planes, plane_stride=plane_stride,
    )  # fmt: skip
    return lay, per_segment


def reference_chunk(lay: KVLayout, arrays: list[np.ndarray], ids: np.ndarray) -> np.ndarray:
    """The chunk buffer [layers, planes, blocks, plane_bytes], by numpy indexing."""
    pb = lay.block_bytes // lay.planes
    out = np.empty((lay.num_layers, lay.planes, len(ids), pb), dtype=np.uint8)
    for li, p in enumerate(lay.layers):
        for plane in range(lay.planes):
            for j, b in enumerate(ids):
                at = p.offset + plane * lay.plane_stride + int(b) * lay.block_stride
                out[li, plane, j] = arrays[p.segment][at : at + pb]
    return out


@settings(max_examples=60, deadline=None)
@given(
    layers=st.integers(1, 4),
    planes=st.integers(1, 2),
    blocks=st.integers(2, 12),
    pb=st.sampled_from([1, 8, 64, 100]),
    gap=st.sampled_from([0, 0, 8]),
    segments=st.integers(1, 3),
    bpc=st.integers(1, 4),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_gather_then_scatter_matches_numpy(  # noqa: PLR0917
    layers: int, planes: int, blocks: int, pb: int, gap: int, segments: int, bpc: int,
    seed: int, data: st.DataObject,
) -> None:  # fmt: skip
    segments, bpc = min(segments, layers), min(bpc, blocks)
    lay, sizes = layout_of(layers, planes, blocks, pb, gap, segments)
    rng = np.random.default_rng(seed)
    arrays = [rng.integers(0, 256, n, dtype=np.uint8) for n in sizes]
    chunks = data.draw(st.integers(1, blocks // bpc))
    ids = rng.permutation(blocks)[: chunks * bpc].astype(np.int64)
    if data.draw(st.booleans()):  # runs of consecutive ids take the one-memcpy path
        ids = np.arange(chunks * bpc, dtype=np.int64)
    copier = BlockCopier(lay, arrays, bpc)
    bufs = [np.zeros(copier.chunk_bytes, dtype=np.uint8) for _ in range(chunks)]
    copier.gather_range(ids, list(enumerate(bufs)))
    for i, buf in enumerate(bufs):
        want = reference_chunk(lay, arrays, ids[i * bpc : (i + 1) * bpc])
        assert np.array_equal(buf.reshape(want.shape), want)

    # Scatter into other blocks (a permutation), skipping the first `skip` blocks.
    before = [a.copy() for a in arrays]
    dst = rng.permutation(ids).astype(np.int64)
    skip = data.draw(st.integers(0, len(ids)))
    copier.scatter_range(dst, [bytes(b) for b in bufs], skip)  # read-only buffers are fine
    expected = [a.copy() for a in before]
    src_chunk = np.concatenate([b.reshape(layers, planes, bpc, pb) for b in bufs], axis=2)
    for li, p in enumerate(lay.layers):
        for plane in range(planes):
            for j in range(skip, len(dst)):
                at = p.offset + plane * lay.plane_stride + int(dst[j]) * lay.block_stride
                expected[p.segment][at : at + pb] = src_chunk[li, plane, j]
    for got, want in zip(arrays, expected, strict=True):
        assert np.array_equal(got, want)


@pytest.fixture
def small() -> tuple[BlockCopier, np.ndarray]:
    lay, sizes = layout_of(2, 2, 8, 16, 0, 1)
    arr = np.arange(sizes[0], dtype=np.uint64).astype(np.uint8)
    return BlockCopier(lay, [arr], 4), arr


def test_bad_arguments_are_errors_not_crashes(small: tuple[BlockCopier, np.ndarray]) -> None:
    copier, _ = small
    buf = np.zeros(copier.chunk_bytes, dtype=np.uint8)
    with pytest.raises(ValueError, match="out of range"):
        copier.gather(np.array([0, 1, 2, 8], dtype=np.int64), 0, buf)
    with pytest.raises(ValueError, match="out of range"):
        copier.scatter(buf, np.array([0, -1, 2, 3], dtype=np.int64), 0)
    with pytest.raises(ValueError, match="cannot hold"):
        copier.gather(np.arange(4, dtype=np.int64), 0, buf[:-1])
    with pytest.raises((BufferError, TypeError)):  # a gather must be able to write its buffer
        copier.gather(np.arange(4, dtype=np.int64), 0, bytes(copier.chunk_bytes))
    with pytest.raises((BufferError, ValueError)):  # not contiguous
        copier.gather(np.arange(4, dtype=np.int64), 0, np.zeros(2 * copier.chunk_bytes)[::2])
    with pytest.raises(ValueError, match="writable"):
        BlockCopier(copier.layout, [np.zeros(4096, dtype=np.uint8)[::2]], 4)
    with pytest.raises(ValueError, match="chunks for"):
        copier.scatter_range(np.arange(4, dtype=np.int64), [buf, buf])
    copier.release()
    with pytest.raises(TransferError, match="unregistered"):
        copier.gather(np.arange(4, dtype=np.int64), 0, buf)


def test_skip_blocks_validation() -> None:
    assert skip_blocks(32, 256, 16) == 2
    for bad in (-16, 8, 272):
        with pytest.raises(ValueError, match="multiple of the block size"):
            skip_blocks(bad, 256, 16)


# ----- SIGBUS: a peer truncates the memory under the copy ----------------------------------


@pytest.fixture
def truncatable() -> Iterator[tuple[int, np.ndarray, BlockCopier]]:
    """A copier over a file mapping that the test can shrink under it (fd, array, copier)."""
    lay, sizes = layout_of(4, 2, 64, 4096, 0, 1)
    with tempfile.NamedTemporaryFile(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as f:
        os.ftruncate(f.fileno(), sizes[0])
        m = mmap.mmap(f.fileno(), sizes[0])
        arr = np.frombuffer(m, dtype=np.uint8)
        arr[:] = 7
        yield f.fileno(), arr, BlockCopier(lay, [arr], 16)
        del arr
        with contextlib.suppress(BufferError):  # the copier still exports it; collected with it
            m.close()


def test_truncated_memory_ends_the_copy_with_an_error(
    truncatable: tuple[int, np.ndarray, BlockCopier],
) -> None:
    fd, _, copier = truncatable
    ids = np.arange(64, dtype=np.int64)
    buf = np.zeros(copier.chunk_bytes, dtype=np.uint8)
    copier.gather(ids, 0, buf)  # intact: fine
    assert (buf == 7).all()
    os.ftruncate(fd, 4096)  # the peer shrinks its segment to one page
    for _ in range(3):  # and it keeps failing cleanly, not just once
        with pytest.raises(TransferError, match=r"SIGBUS.*truncated"):
            copier.gather(ids, 1, buf)
        with pytest.raises(TransferError, match="SIGBUS"):
            copier.scatter(buf, ids, 2)
    # Other threads fault independently: each gets its own error.
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            copier.gather(ids, 3, np.zeros(copier.chunk_bytes, dtype=np.uint8))
        except TransferError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 4
    os.ftruncate(fd, copier._arrays[0].nbytes)  # grown back: pages read as zeros again
    copier.gather(ids, 0, buf)
    assert not buf[copier.plane_bytes * 16 :].any()


FOREIGN_FAULT = """
    import faulthandler, mmap, os, sys, tempfile
    import numpy as np
    from lmcache.engine import _blockcopy
    if sys.argv[1] == "before":
        faulthandler.enable()
    _blockcopy.install()
    if sys.argv[1] == "after":
        faulthandler.enable()
    f = tempfile.TemporaryFile()
    os.ftruncate(f.fileno(), 8192)
    arr = np.frombuffer(mmap.mmap(f.fileno(), 8192), dtype=np.uint8)
    os.ftruncate(f.fileno(), 0)
    print("touching", flush=True)
    arr[4096] = 1  # outside any guarded copy: this must still be fatal
    print("survived", flush=True)
"""


@pytest.mark.parametrize("faulthandler_when", ["never", "before", "after"])
def test_a_fault_outside_a_copy_is_still_fatal(faulthandler_when: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(FOREIGN_FAULT), faulthandler_when],
        check=False, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert "touching" in proc.stdout and "survived" not in proc.stdout
    assert proc.returncode == -signal.SIGBUS, proc.stderr
    if faulthandler_when != "never":  # the handler that was there before us still ran
        assert "Bus error" in proc.stderr


def test_copies_survive_faulthandler_installed_later(
    truncatable: tuple[int, np.ndarray, BlockCopier],
) -> None:
    # pytest itself enables faulthandler; a later enable() replaces our handler, and the
    # next copy puts ours back in front of it.
    import faulthandler

    fd, _, copier = truncatable
    faulthandler.enable()
    _blockcopy.install()
    faulthandler.disable()
    faulthandler.enable()
    os.ftruncate(fd, 0)
    with pytest.raises(TransferError):
        copier.gather(np.arange(16, dtype=np.int64), 0, np.zeros(copier.chunk_bytes, np.uint8))
