"""The one copy routine (`BlockCopier` over the C `_blockcopy`): bytes, bounds and SIGBUS.

Correctness is checked against plain numpy indexing of the same layout, for every thread
count (a contract: one suite, parametrized), with copies split into parts and streamed even
at test sizes (`tuned`); the SIGBUS tests truncate a file this test created under a mapping
this test made.
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


THREADS = [1, 2, 4]


@contextlib.contextmanager
def tuned(stream_min_bytes: int = 0, part_min_bytes: int = 1) -> Iterator[None]:
    """Streamed stores and one part per thread even for tiny copies (production thresholds
    are in MiB), so that test sizes take the paths that real ones do."""
    before = _blockcopy._tune(stream_min_bytes, part_min_bytes)
    try:
        yield
    finally:
        _blockcopy._tune(*before)


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


@pytest.mark.parametrize("threads", THREADS)
@settings(max_examples=40, deadline=None)
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
    threads: int, layers: int, planes: int, blocks: int, pb: int, gap: int, segments: int,
    bpc: int, seed: int, data: st.DataObject,
) -> None:  # fmt: skip
    streamed = data.draw(st.booleans())
    with tuned(0 if streamed else 1 << 62, 1):
        check_gather_then_scatter(
            threads, layers, planes, blocks, pb, gap, segments, bpc, seed, data
        )  # fmt: skip


def check_gather_then_scatter(  # noqa: PLR0917
    threads: int, layers: int, planes: int, blocks: int, pb: int, gap: int, segments: int,
    bpc: int, seed: int, data: st.DataObject,
) -> None:  # fmt: skip
    segments, bpc = min(segments, layers), min(bpc, blocks)
    lay, sizes = layout_of(layers, planes, blocks, pb, gap, segments)
    rng = np.random.default_rng(seed)
    arrays = [rng.integers(0, 256, n, dtype=np.uint8) for n in sizes]
    chunks = data.draw(st.integers(1, blocks // bpc))
    ids = rng.permutation(blocks)[: chunks * bpc].astype(np.int64)
    if data.draw(st.booleans()):  # runs of consecutive ids take the one-memcpy path
        ids = np.arange(chunks * bpc, dtype=np.int64)
    copier = BlockCopier(lay, arrays, bpc, copy_threads=threads)
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


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize(
    ("pb", "gap", "ids"),
    [
        (32768, 0, [3, 4, 5, 6, 0, 1, 9, 10]),  # runs of adjacent blocks: coalesced pieces
        (32768, 0, [7, 1, 5, 3, 11, 9, 0, 2]),  # no two adjacent
        (4099, 0, [2, 3, 4, 5, 6, 7, 8, 9]),  # odd size, one long run, unaligned everywhere
        (4099, 13, [2, 3, 4, 5, 6, 7, 8, 9]),  # odd size, gaps: adjacent ids, not coalesced
        (20000, 64, [11, 0, 6, 5, 1, 2, 10, 7]),
    ],
)
def test_round_trip_byte_for_byte(threads: int, pb: int, gap: int, ids: list[int]) -> None:
    """Gather then scatter elsewhere, with skipped blocks, streamed and split into parts."""
    lay, sizes = layout_of(3, 2, 12, pb, gap, 2)
    rng = np.random.default_rng(pb + gap)
    arrays = [rng.integers(0, 256, n, dtype=np.uint8) for n in sizes]
    src = np.array(ids, dtype=np.int64)
    for stream_min in (0, 1 << 62):  # streamed stores, then plain memcpy
        with tuned(stream_min, 1):
            copier = BlockCopier(lay, arrays, 4, copy_threads=threads)
            bufs = [np.zeros(copier.chunk_bytes, dtype=np.uint8) for _ in range(2)]
            copier.gather_range(src, list(enumerate(bufs)))
            want = np.concatenate(
                [reference_chunk(lay, arrays, src[:4]), reference_chunk(lay, arrays, src[4:])],
                axis=2,
            )
            got = np.concatenate([b.reshape(3, 2, 4, pb) for b in bufs], axis=2)
            assert np.array_equal(got, want)
            dst = np.array([i for i in range(12) if i not in ids[:4]][:8], dtype=np.int64)
            before = reference_chunk(lay, arrays, dst)
            copier.scatter_range(dst, bufs, skip_blocks=3)
            after = reference_chunk(lay, arrays, dst)
            assert np.array_equal(after[:, :, :3], before[:, :, :3])  # skipped: untouched
            assert np.array_equal(after[:, :, 3:], want[:, :, 3:])


def test_copy_threads_knob() -> None:
    lay, sizes = layout_of(1, 1, 4, 64, 0, 1)
    arr = np.zeros(sizes[0], dtype=np.uint8)
    auto = BlockCopier(lay, [arr], 2).copy_threads
    assert auto == min(4, len(os.sched_getaffinity(0)))
    assert BlockCopier(lay, [arr], 2, copy_threads=3).copy_threads == 3
    with pytest.raises(ValueError, match="copy_threads"):
        BlockCopier(lay, [arr], 2, copy_threads=-1)
    with pytest.raises(ValueError, match="threads"):
        _blockcopy.copy_blocks(
            np.zeros(1, np.uint64), np.zeros(1, np.int64), 1, 64, 64, arr, 1, 0, False, 65
        )  # fmt: skip


FORKED = """
    import os, sys
    import numpy as np
    from lmcache.engine import _blockcopy
    from tests.test_blockcopy import layout_of, tuned
    from lmcache.engine.transfer import BlockCopier
    lay, sizes = layout_of(4, 2, 8, 4096, 0, 1)
    arr = np.arange(sizes[0], dtype=np.uint64).astype(np.uint8)
    copier = BlockCopier(lay, [arr], 8, copy_threads=4)
    buf = np.zeros(copier.chunk_bytes, dtype=np.uint8)
    with tuned(0, 1):
        copier.gather(np.arange(8), 0, buf)  # the pool's threads exist now
        pid = os.fork()
        if pid == 0:  # only this thread survives the fork: the pool must start again
            copier.gather(np.arange(8), 0, buf)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
    print("child", os.waitstatus_to_exitcode(status))
"""


def test_a_forked_child_copies_with_a_fresh_pool() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(FORKED)],
        check=False, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.stdout.strip() == "child 0", proc.stderr


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


@pytest.mark.parametrize("threads", [2, 4])
def test_a_fault_in_one_of_several_copy_threads_fails_the_call(
    truncatable: tuple[int, np.ndarray, BlockCopier], threads: int
) -> None:
    """Parts of one call run on pool threads: the one that faults unwinds its own guard, the
    others finish or stop, and the call reports the fault once all of them are done."""
    fd, arr, plain = truncatable
    copier = BlockCopier(plain.layout, [arr], 16, copy_threads=threads)
    ids = np.arange(64, dtype=np.int64)
    buf = np.zeros(copier.chunk_bytes, dtype=np.uint8)
    with tuned(0, 1):
        copier.gather(ids, 0, buf)
        assert (buf == 7).all()
        os.ftruncate(fd, arr.nbytes // 2)  # later layers fault, earlier ones copy fine
        for _ in range(5):
            with pytest.raises(TransferError, match="SIGBUS"):
                copier.gather(ids, 1, buf)
            with pytest.raises(TransferError, match="SIGBUS"):
                copier.scatter(buf, ids, 2)
        errors: list[BaseException] = []

        def worker() -> None:  # several calls at once share the pool; each gets its error
            try:
                copier.gather(ids, 3, np.zeros(copier.chunk_bytes, dtype=np.uint8))
            except TransferError as exc:
                errors.append(exc)

        workers = [threading.Thread(target=worker) for _ in range(4)]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        assert len(errors) == 4
        os.ftruncate(fd, arr.nbytes)  # grown back: the pool's threads still copy
        copier.gather(ids, 0, buf)
        half = copier.chunk_bytes // 2
        assert (buf[:half] == 7).all() and not buf[half:].any()


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
