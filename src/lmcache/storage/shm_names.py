"""Who holds a shared-memory segment's name: validated names under ``/dev/shm``, the
creator's liveness lock, and the sweep that removes names whose creator is gone.

This is its own module because it is the one protocol that decides when a name in a
directory shared by every process (and every container with ``--ipc host``) may be taken
or removed; `lmcache.storage.shm` builds segments on it, and the server's start-up and
reaper sweep with it without mapping anything.

Liveness is a lock, never a pid. The creator of a segment holds ``flock(LOCK_SH)``
on it for as long as the segment is its (until `ShmSegment.unlink`, or until the
process dies: the kernel drops the lock then, whatever killed it). A segment is
*stale* when ``flock(LOCK_EX | LOCK_NB)`` on a freshly opened descriptor succeeds;
it is unlinked while that lock is held, and only if the name still leads to the
locked file. The pid in a name is only there to make names distinct: another PID
namespace sharing /dev/shm (``docker --ipc host``) sees live engines' pids as dead
or as somebody else, and a server that is PID 1 of its container sees itself in
the name of the pool its crashed predecessor left behind.

Why removal cannot take a live segment: a creator makes the file with ``O_EXCL``
and then takes its shared lock *blocking*; if a sweeper got the exclusive lock
between the two, the sweeper unlinks the file before it lets go, so the creator
wakes up holding a lock on a file that no longer has the name, sees that (``stat``
of the name against ``fstat`` of its descriptor) and starts again. Once the
creator holds its lock, no exclusive lock succeeds until it unlinks or dies.

``LMCACHE_SHM_DIR`` moves the directory (tests use it to stand for another host).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import stat
from typing import Literal

_CREATE_ATTEMPTS = 100  # a name lost to a concurrent sweep this often is not a race any more

# Names are single path components: a peer must never make us open ../../etc/passwd.
_NAME_RE = re.compile(r"^/?[A-Za-z0-9_.\-]{1,200}$")


def shm_dir() -> str:
    return os.environ.get("LMCACHE_SHM_DIR", "/dev/shm")


def shm_path(name: str) -> str:
    """Validate a segment name (``/foo`` or ``foo``) and return its path under /dev/shm."""
    if not _NAME_RE.match(name) or name.lstrip("/") in (".", ".."):
        raise ValueError(f"invalid shared-memory segment name {name!r}")
    return os.path.join(shm_dir(), name.lstrip("/"))


def free_shm_bytes() -> int:
    """Bytes free in the shared-memory directory now."""
    st = os.statvfs(shm_dir())
    return st.f_bavail * st.f_frsize


def _same_file(fd: int, path: str) -> bool:
    """Whether ``path`` (not followed if a link) is the file open as ``fd``."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def unlink_if_same(fd: int, path: str) -> None:
    """Remove ``path`` only while it still names the file open as ``fd`` (after a sweep,
    the name may belong to somebody else's new segment)."""
    with contextlib.suppress(FileNotFoundError):
        if _same_file(fd, path):
            os.unlink(path)


def create_locked(path: str) -> int | None:
    """A new file at ``path`` (mode 0600) whose shared lock we hold, replacing a stale one;
    None when a live segment has the name."""
    for _ in range(_CREATE_ATTEMPTS):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            if _sweep(path) == "live":
                return None
            continue  # removed (stale) or gone meanwhile: try the name again
        try:
            # Blocking: an exclusive lock on this file is only ever held by a sweep, for
            # the time it takes to unlink it.
            fcntl.flock(fd, fcntl.LOCK_SH)
            if _same_file(fd, path):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # swept between our open and our lock: the name is free again
    raise OSError(f"could not create {path}: it kept being removed by another process")


def release_lock(fd: int) -> None:
    """Drop the creator's lock on a segment whose name is gone (it guards nothing then).
    Closing ``fd`` would not drop it while the file is mapped: a mapping holds the open
    file, and with it the lock, until unmapped; an engine's KV tensors stay mapped until
    the process exits, and the segment guard waiting on that lock would wait as long."""
    fcntl.flock(fd, fcntl.LOCK_UN)


Sweep = Literal["removed", "gone", "live", "foreign"]


def _sweep(path: str, wait_for: tuple[int, int] | None = None) -> Sweep:
    """Unlink ``path`` if it is a stale segment of ours: nobody holds its lock.

    ``wait_for`` (``st_dev, st_ino``): only that file, and wait until nobody holds it
    (instead of answering "live"): the segment guard's one call."""
    try:
        # O_NONBLOCK: a FIFO of that name must not make us wait for a writer.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return "gone"
    except OSError:  # a symlink (ELOOP), unreadable, ...: not one of ours
        return "foreign"
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
            return "foreign"
        if wait_for is not None and (st.st_dev, st.st_ino) != wait_for:
            return "foreign"  # the name leads to another file now: not the one guarded
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait_for else fcntl.LOCK_NB))
        except BlockingIOError:
            return "live"
        if not _same_file(fd, path):
            return "gone"  # unlinked (and maybe re-created) since we opened it
        os.unlink(path)  # still under our exclusive lock: nobody can be using the name
        return "removed"
    finally:
        os.close(fd)


def unlink_when_released(path: str, identity: tuple[int, int]) -> bool:
    """Block until nobody holds the lock of the file at ``path``, then unlink it if the name
    still leads to that file and it is ``identity`` (``st_dev, st_ino``): the one a guard
    was started for. Whether it was removed. For `lmcache.engine.segment_guard`."""
    return _sweep(path, wait_for=identity) == "removed"


def segment_is_live(name: str) -> bool:
    """Whether segment ``name`` exists and its creator (a process alive now, in any PID
    namespace sharing this directory) still holds it."""
    path = shm_path(name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return False
    except OSError:
        return True  # there, but not ours to check (another user's, a symlink): hands off
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops the exclusive lock if we got it
    return False


def unlink_if_stale(name: str) -> Sweep:
    """Unlink segment ``name`` if it is ours and no live process holds it (its creator
    died without unlinking it): "removed"; else why not ("live": still held)."""
    return _sweep(shm_path(name))


def unlink_stale_segments(prefix: str) -> list[str]:
    """Unlink the segments named ``<prefix>...`` of this user that no live process holds
    (whatever pid their names carry); return their names."""
    removed = []
    for entry in os.scandir(shm_dir()):
        if entry.name.startswith(prefix) and _sweep(entry.path) == "removed":
            removed.append(entry.name)
    return sorted(removed)
