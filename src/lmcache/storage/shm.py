"""Named POSIX shared-memory segments (``/dev/shm/<name>``) mapped with numpy views.

Every segment we create ends with a *seal* page holding a random token::

    [ data: size bytes .................................. ][ LMCSEAL1 | token | 0... ]

The creator tells its peer the token over ZMQ, and the peer refuses a segment
whose seal differs. Names alone are not proof: a segment of the same name may
belong to another process (pids repeat across hosts and containers), and mapping
the wrong one would hand out somebody else's KV bytes.

``LMCACHE_SHM_DIR`` moves the directory (tests use it to stand for another host).

We use plain files under ``/dev/shm`` instead of `multiprocessing.shared_memory`
because the latter registers every segment with a resource tracker that unlinks
(or warns about) segments it does not own; the server must map segments that
engines own, and own its pool without a helper process second-guessing it.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import re
import stat

import numpy as np

from lmcache.errors import ConfigError

logger = logging.getLogger(__name__)

SEAL_MAGIC = b"LMCSEAL1"
SEAL_BYTES = 4096  # one page after the data


def shm_dir() -> str:
    return os.environ.get("LMCACHE_SHM_DIR", "/dev/shm")


def new_token() -> bytes:
    return os.urandom(16)


# Names are single path components: a peer must never make us open ../../etc/passwd.
_NAME_RE = re.compile(r"^/?[A-Za-z0-9_.\-]{1,200}$")


def shm_path(name: str) -> str:
    """Validate a segment name (``/foo`` or ``foo``) and return its path under /dev/shm."""
    if not _NAME_RE.match(name) or name.lstrip("/") in (".", ".."):
        raise ValueError(f"invalid shared-memory segment name {name!r}")
    return os.path.join(shm_dir(), name.lstrip("/"))


class ShmSegment:
    """One mapped segment. ``array`` is a writable uint8 view of all of it."""

    def __init__(self, name: str, fd: int, size: int, owner: bool, populate: bool = True) -> None:
        self.name = "/" + name.lstrip("/")
        self.size = size  # data bytes, without the seal page
        self.owner = owner
        # MAP_POPULATE builds this process's page tables now. Without it every first touch
        # of a 4 KiB page in a copy is a minor fault: measured, a 671 MB worker copy into a
        # fresh mapping of the L1 pool ran at 1.4 GB/s instead of 5.3 (164k faults).
        flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if populate else 0)
        try:
            self._mmap: mmap.mmap | None = mmap.mmap(fd, size + SEAL_BYTES, flags=flags)
        finally:
            os.close(fd)
        whole = np.frombuffer(self._mmap, dtype=np.uint8)
        self.array: np.ndarray = whole[:size]
        self._seal = whole[size : size + len(SEAL_MAGIC) + 16]

    @property
    def token(self) -> bytes:
        return self._seal[len(SEAL_MAGIC) :].tobytes()

    @classmethod
    def create(cls, name: str, size: int, token: bytes | None = None) -> ShmSegment:
        """Create, size and pre-fault a new segment private to this user (mode 0600)."""
        path = shm_path(name)
        free = _free_bytes(shm_dir())
        if size + SEAL_BYTES > free:
            raise ConfigError(
                f"cannot allocate {size / (1 << 30):.2f} GiB of shared memory: {shm_dir()} has "
                f"{free / (1 << 30):.2f} GiB free (lower --l1-size-gb or enlarge {shm_dir()}, "
                "e.g. docker --shm-size)"
            )
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.fchmod(fd, 0o600)  # the umask cannot widen it, but be explicit
            # posix_fallocate reserves tmpfs pages now: ENOSPC here, not SIGBUS later.
            os.posix_fallocate(fd, 0, size + SEAL_BYTES)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        segment = cls(name, fd, size, owner=True)
        segment._seal[:] = np.frombuffer(SEAL_MAGIC + (token or new_token()), dtype=np.uint8)
        return segment

    @classmethod
    def attach(cls, name: str, token: bytes, populate: bool = True) -> ShmSegment:
        """Map a segment created by another process of this user, if its seal is ``token``.

        Attaching happens at registration, off the data path, so by default it pre-faults
        the mapping (``populate``); pass False to map a segment only to read a little of it.
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
        except BaseException:
            os.close(fd)
            raise
        segment = cls(name, fd, st.st_size - SEAL_BYTES, owner=False, populate=populate)
        if segment._seal[: len(SEAL_MAGIC)].tobytes() != SEAL_MAGIC or segment.token != token:
            segment.close()
            raise ValueError(
                f"segment {name!r} is not the one announced (its seal does not match): "
                "it belongs to another process or host"
            )
        return segment

    def close(self) -> None:
        """Unmap (views still held elsewhere keep the mapping alive until collected)."""
        mapping, self._mmap = self._mmap, None
        self.array = np.empty(0, dtype=np.uint8)
        self._seal = np.empty(0, dtype=np.uint8)
        if mapping is not None:
            with contextlib.suppress(BufferError):
                mapping.close()

    def unlink(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(shm_path(self.name))


def _free_bytes(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def unlink_stale_segments(prefix: str) -> list[str]:
    """Unlink ``<prefix><pid>[_<n>]`` segments of this user whose process is gone."""
    removed = []
    for entry in os.scandir(shm_dir()):
        if not entry.name.startswith(prefix):
            continue
        pid_text = entry.name[len(prefix) :].split("_")[0]
        if not pid_text.isdigit() or _pid_alive(int(pid_text)):
            continue
        with contextlib.suppress(OSError):
            if entry.stat().st_uid == os.getuid():
                os.unlink(entry.path)
                removed.append(entry.name)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
