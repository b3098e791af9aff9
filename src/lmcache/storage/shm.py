"""Named POSIX shared-memory segments (``/dev/shm/<name>``) mapped with numpy views.

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

SHM_DIR = "/dev/shm"
# Names are single path components: a peer must never make us open ../../etc/passwd.
_NAME_RE = re.compile(r"^/?[A-Za-z0-9_.\-]{1,200}$")


def shm_path(name: str) -> str:
    """Validate a segment name (``/foo`` or ``foo``) and return its path under /dev/shm."""
    if not _NAME_RE.match(name) or name.lstrip("/") in (".", ".."):
        raise ValueError(f"invalid shared-memory segment name {name!r}")
    return os.path.join(SHM_DIR, name.lstrip("/"))


class ShmSegment:
    """One mapped segment. ``array`` is a writable uint8 view of all of it."""

    def __init__(self, name: str, fd: int, size: int, owner: bool) -> None:
        self.name = "/" + name.lstrip("/")
        self.size = size
        self.owner = owner
        flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if owner else 0)
        try:
            self._mmap: mmap.mmap | None = mmap.mmap(fd, size, flags=flags)
        finally:
            os.close(fd)
        self.array: np.ndarray = np.frombuffer(self._mmap, dtype=np.uint8)

    @classmethod
    def create(cls, name: str, size: int) -> ShmSegment:
        """Create, size and pre-fault a new segment private to this user (mode 0600)."""
        path = shm_path(name)
        free = _free_bytes(SHM_DIR)
        if size > free:
            raise ConfigError(
                f"cannot allocate {size / (1 << 30):.2f} GiB of shared memory: {SHM_DIR} has "
                f"{free / (1 << 30):.2f} GiB free (lower --l1-size-gb or enlarge {SHM_DIR}, "
                "e.g. docker --shm-size)"
            )
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.fchmod(fd, 0o600)  # the umask cannot widen it, but be explicit
            # posix_fallocate reserves tmpfs pages now: ENOSPC here, not SIGBUS later.
            os.posix_fallocate(fd, 0, size)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        return cls(name, fd, size, owner=True)

    @classmethod
    def attach(cls, name: str) -> ShmSegment:
        """Map an existing segment created by another process of the same user."""
        path = shm_path(name)
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ValueError(f"{name!r} is not a shared-memory segment")
            if st.st_uid != os.getuid():
                raise ValueError(f"segment {name!r} belongs to another user")
            if st.st_size == 0:
                raise ValueError(f"segment {name!r} is empty")
        except BaseException:
            os.close(fd)
            raise
        return cls(name, fd, st.st_size, owner=False)

    def close(self) -> None:
        """Unmap (views still held elsewhere keep the mapping alive until collected)."""
        mapping, self._mmap = self._mmap, None
        self.array = np.empty(0, dtype=np.uint8)
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
    for entry in os.scandir(SHM_DIR):
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
