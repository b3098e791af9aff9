"""Named POSIX shared-memory segments (``/dev/shm/<name>``) mapped with numpy views.

Every segment we create ends with a *seal* page holding a random token::

    [ data: size bytes .................................. ][ LMCSEAL1 | token | 0... ]

The creator tells its peer the token over ZMQ, and the peer refuses a segment
whose seal differs. Names alone are not proof: a segment of the same name may
belong to another process (pids repeat across hosts and containers), and mapping
the wrong one would hand out somebody else's KV bytes.

Who may take or remove a name (the creator's liveness lock, the sweep of stale names) is
`lmcache.storage.shm_names`; a segment is created holding that lock.

We use plain files under ``/dev/shm`` instead of `multiprocessing.shared_memory`
because the latter registers every segment with a resource tracker that unlinks
(or warns about) segments it does not own; the server must map segments that
engines own, and own its pool without a helper process second-guessing it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import stat
from collections.abc import Iterator

import numpy as np

from lmcache.errors import ConfigError
from lmcache.progress import Progress
from lmcache.storage.shm_names import (
    create_locked,
    free_shm_bytes,
    release_lock,
    shm_dir,
    shm_path,
    unlink_if_same,
)

logger = logging.getLogger(__name__)

SEAL_MAGIC = b"LMCSEAL1"
SEAL_BYTES = 4096  # one page after the data
_SEAL_LEN = len(SEAL_MAGIC) + 16
_SUFFIXES = 1000  # `create` tries name, name_1 ... name_999 when live segments hold them
_RESERVE_STEP = 1 << 30  # `create` reserves memory in steps of this (~0.2 s each)
_PROGRESS_MIN_BYTES = 1 << 30  # smaller segments are quick: no progress thread for them


def new_token() -> bytes:
    return os.urandom(16)


class SegmentExistsError(FileExistsError):
    """A live segment (its creator holds its lock) already has the name."""


class ShmSegment:
    """One segment: an open descriptor ``fd`` and, mapped, ``array`` (a writable uint8 view).

    The creator's descriptor holds the segment's liveness lock. A peer's segment may shrink
    under our mapping: copy through it only with `lmcache.engine.transfer.BlockCopier`,
    which turns the resulting SIGBUS into an error.
    """

    def __init__(
        self, name: str, fd: int, size: int, *, owner: bool, token: bytes, populate: bool = True
    ) -> None:
        self.name = "/" + name.lstrip("/")
        self.size = size  # data bytes, without the seal page
        self.owner = owner
        self._token = token
        self._fd: int | None = fd
        self._closed = self._unlinked = False
        self._mmap: mmap.mmap | None = None
        self.array: np.ndarray = np.empty(0, dtype=np.uint8)
        # MAP_POPULATE builds this process's page tables now. Without it every first touch
        # of a 4 KiB page in a copy is a minor fault: measured, a 671 MB worker copy into a
        # fresh mapping of the L1 pool ran at 1.4 GB/s instead of 5.3 (164k faults).
        flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if populate else 0)
        self._mmap = mmap.mmap(fd, size + SEAL_BYTES, flags=flags)  # the caller closes fd on error
        self.array = np.frombuffer(self._mmap, dtype=np.uint8)[:size]

    reserved = 0  # bytes from the start that have memory (all of them unless lazy)

    def reserve(self, upto: int) -> int:
        """Give the first ``upto`` bytes memory (a lazy segment grows); returns the bytes
        reserved now, fewer than asked when /dev/shm is full (ENOSPC, never a SIGBUS)."""
        upto = min(upto, self.size)
        if upto > self.reserved:
            try:
                os.posix_fallocate(self.fd, self.reserved, upto - self.reserved)
                self.reserved = upto
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
        return self.reserved

    @property
    def token(self) -> bytes:
        return self._token

    @property
    def fd(self) -> int:
        """The segment's open descriptor (valid until `close`)."""
        if self._fd is None:
            raise ValueError(f"segment {self.name} is closed")
        return self._fd

    @classmethod
    def create(
        cls,
        name: str,
        size: int,
        token: bytes | None = None,
        *,
        exact: bool = False,
        reserve: int | None = None,
    ) -> ShmSegment:
        """Create, size and pre-fault a new segment private to this user (mode 0600).

        A stale segment of that name (its creator is gone) is replaced. When a live one has
        it, ``exact`` raises `SegmentExistsError`; otherwise the segment is created as
        ``<name>_1``, ``<name>_2``, ...: read the name it got from ``.name``.

        ``reserve``: a lazy segment. Only its first ``reserve`` bytes get memory now; the
        rest is a hole that `reserve` fills later. Nothing may touch the hole: a page there
        that tmpfs cannot back is a SIGBUS (the L1 hands out only reserved pages).
        """
        lazy = reserve is not None and reserve < size
        now = min(size, reserve) if reserve is not None else size
        free = free_shm_bytes()
        if now + SEAL_BYTES > free:
            raise ConfigError(
                f"cannot allocate {size / (1 << 30):.2f} GiB of shared memory: {shm_dir()} has "
                f"{free / (1 << 30):.2f} GiB free (lower --l1-size-gb or --l1-init-size-gb, or "
                f"enlarge {shm_dir()}, "
                "e.g. docker --shm-size)"
            )
        base = name.lstrip("/")
        candidates = [base] if exact else [base, *(f"{base}_{i}" for i in range(1, _SUFFIXES))]
        for candidate in candidates:
            path = shm_path(candidate)
            fd = create_locked(path)
            if fd is not None:
                break
        else:
            what = f"{name!r}" if exact else f"{name!r} and {_SUFFIXES - 1} suffixed names"
            raise SegmentExistsError(
                f"shared-memory segment {what} in use by a live process (it holds the "
                f"segment's lock); remove it only if you know it is unused ({shm_dir()})"
            )
        if candidate != base:
            logger.info("/%s is in use by a live process: created /%s instead", base, candidate)
        token = token or new_token()
        try:
            os.fchmod(fd, 0o600)  # the umask cannot widen it, but be explicit
            # posix_fallocate reserves tmpfs pages now: ENOSPC here, not SIGBUS later.
            os.ftruncate(fd, size + SEAL_BYTES)
            os.posix_fallocate(fd, size, SEAL_BYTES)
            os.pwrite(fd, SEAL_MAGIC + token, size)
            with _progress(candidate, now) as done:
                for start in range(0, now, _RESERVE_STEP):  # in steps: progress can be shown
                    os.posix_fallocate(fd, start, min(_RESERVE_STEP, now - start))
                    done[0] = min(now, start + _RESERVE_STEP)
                # A lazy segment is not pre-faulted: faulting its hole would fill /dev/shm.
                segment = cls(candidate, fd, size, owner=True, token=token, populate=not lazy)
            segment.reserved = now
            return segment
        except BaseException:
            unlink_if_same(fd, path)
            os.close(fd)
            raise

    @classmethod
    def attach(cls, name: str, token: bytes, populate: bool = True) -> ShmSegment:
        """Map a segment created by another process of this user, if its seal is ``token``.

        Attaching happens at registration, off the data path, so by default it pre-faults
        the mapping (``populate``); pass False to map a segment only to read a little of it.
        The seal is read through the descriptor, so a file that shrinks meanwhile is refused
        instead of faulting.
        """
        path = shm_path(name)
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ValueError(f"{name!r} is not a shared-memory segment")
            if st.st_uid != os.getuid():
                raise ValueError(f"segment {name!r} belongs to another user")
            if st.st_size <= SEAL_BYTES:
                raise ValueError(f"segment {name!r} is too small to be an LMCache segment")
            size = st.st_size - SEAL_BYTES
            # A lazy segment (a hole after its reserved part) must not be pre-faulted:
            # MAP_POPULATE would give every page of the hole memory, up to all of /dev/shm.
            populate = populate and st.st_blocks * 512 >= st.st_size
            seal = os.pread(fd, _SEAL_LEN, size)
            if seal[: len(SEAL_MAGIC)] != SEAL_MAGIC or seal[len(SEAL_MAGIC) :] != token:
                raise ValueError(
                    f"segment {name!r} is not the one announced (its seal does not match): "
                    "it belongs to another process or host"
                )
            return cls(name, fd, size, owner=False, token=token, populate=populate)
        except BaseException:
            os.close(fd)
            raise

    def unmap(self) -> None:
        """Drop the mapping (views still held elsewhere keep it alive until collected); the
        descriptor stays open."""
        mapping, self._mmap = self._mmap, None
        self.array = np.empty(0, dtype=np.uint8)
        if mapping is not None:
            with contextlib.suppress(BufferError):
                mapping.close()

    def close(self) -> None:
        """Unmap and close the descriptor. The creator keeps its lock (one descriptor) until
        `unlink`: a segment that still has its name is live while its creator lives."""
        self.unmap()
        self._closed = True
        if not self.owner or self._unlinked:
            self._close_fd()

    def unlink(self) -> None:
        """Remove the name, but only while it still leads to this segment's file (after a
        sweep, the name may belong to somebody else's new segment); the creator then drops
        its lock once it has closed the segment."""
        if self._unlinked:
            return
        self._unlinked = True
        path = shm_path(self.name)
        if self._fd is not None:
            unlink_if_same(self._fd, path)
            if self.owner:
                release_lock(self._fd)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        if self._closed:
            self._close_fd()

    def _close_fd(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


@contextlib.contextmanager
def _progress(name: str, nbytes: int) -> Iterator[list[int]]:
    """Progress lines while a large segment gets its memory and page tables (a 100 GiB
    pool takes tens of seconds); yields the reserved-bytes counter the caller updates."""
    done = [0]
    if nbytes < _PROGRESS_MIN_BYTES:
        yield done
        return

    def describe() -> str:
        gib = 1 << 30
        if done[0] < nbytes:
            return (
                f"/{name}: reserving shared memory, {done[0] / gib:.1f} of "
                f"{nbytes / gib:.1f} GiB ({100 * done[0] // nbytes}%)"
            )
        return f"/{name}: {nbytes / gib:.1f} GiB reserved, pre-faulting its pages"

    with Progress(logger, describe):
        yield done
