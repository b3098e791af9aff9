"""`FsL2`: one file per object under a directory, with a capacity limit whose eviction
order is one of the L1's policies (``"eviction_policy"``: LRU by default; see
`lmcache.storage.capacity`). Recency survives a restart (file mtimes); hit counts do not.

    <path>/ab/cd/<key hex>.kv       ab, cd = key bytes 16 and 17 (the start of the chunk hash,
                                    so one model's objects spread over 65536 directories)
    <path>/ab/cd/.<key hex>.<random>.tmp    a write in flight

    put:    temp file <── writev(header, payload) ──os.replace──> <key hex>.kv  (whole or absent)
    get:    read header, then `out` straight from the file, hashing each piece as it lands
            ──verify──> hit | miss + delete
    start:  scandir + stat of every .kv (no reads) ──> index in mtime order; stray .tmp deleted

Files are not fsynced: the rename already gives readers whole objects, and a file
torn by a crash or power loss fails its size or checksum check and becomes a miss.
The in-memory index (one lock) answers `exists` and drives the capacity by its eviction
policy; at start it is rebuilt in mtime order, and hits touch the file's mtime, so that
recency (LRU, FIFO order) survives restarts. One process per directory.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import threading
from collections.abc import Sequence
from typing import Any

import xxhash

from lmcache.progress import Progress
from lmcache.storage.capacity import CapacityIndex
from lmcache.storage.l2.base import (
    Health,
    L2Error,
    byte_view,
    capacity_bytes,
    check_key,
    config_error,
    policy_for,
)
from lmcache.storage.l2.format import CHUNK, HEADER_SIZE, hasher, header_for, unpack_header
from lmcache.types import ObjectKey

logger = logging.getLogger(__name__)

_FAN = re.compile(r"[0-9a-f]{2}")
_OBJECT = re.compile(r"([0-9a-f]{96})\.kv")
_TEMP = re.compile(r"\.[0-9a-f]{96}\.[0-9a-f]+\.tmp")
_CAN_TOUCH_FD = os.utime in os.supports_fd


class FsL2:
    def __init__(
        self,
        path: str | os.PathLike[str],
        max_capacity_gb: float | None = None,
        eviction_policy: str = "LRU",
    ) -> None:
        if not path:
            raise config_error("fs", "'path' is required")
        self.root = os.path.abspath(os.fspath(path))
        self.name = f"fs:{self.root}"
        self.capacity_bytes = capacity_bytes("fs", max_capacity_gb)
        try:
            os.makedirs(self.root, exist_ok=True)
        except OSError as exc:
            raise config_error("fs", f"'path' {self.root!r} cannot be created: {exc}") from exc
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise config_error("fs", f"'path' {self.root!r} is not a writable directory")
        self._lock = threading.Lock()
        # key -> file size, and which file goes first when over capacity
        self._index = CapacityIndex[ObjectKey](
            policy_for("fs", eviction_policy), self.capacity_bytes
        )
        self._dirs: set[str] = set()
        self._health = Health()
        self._closed = False
        try:
            self._rebuild()
        except OSError as exc:
            raise config_error("fs", f"'path' {self.root!r} cannot be indexed: {exc}") from exc

    def __repr__(self) -> str:
        return f"FsL2({self.root!r})"

    # ----- layout ------------------------------------------------------------------------

    def path_of(self, key: ObjectKey) -> str:
        h = key.hex()
        return os.path.join(self.root, h[32:34], h[34:36], h + ".kv")

    def _rebuild(self) -> None:
        """Index every object file from directory entries and stat alone (no reads)."""
        found: list[tuple[int, ObjectKey, int]] = []
        stray = torn = 0
        top = _subdirs(self.root)
        seen = [0]  # top-level directories done

        def describe() -> str:
            return (
                f"{self.name}: indexing, {len(found):,} objects in {seen[0]} of {len(top)} "
                "directories"
            )

        with Progress(logger, describe):
            for d1 in top:
                s, t = self._index_dir(d1, found)
                stray, torn, seen[0] = stray + s, torn + t, seen[0] + 1
        found.sort(key=lambda t: t[0])  # oldest first: the order they were last used in
        with self._lock:
            for _, key, size in found:
                self._drop_locked(self._index.put(key, size))
        if stray or torn:
            logger.info("%s: removed %d stray temp and %d torn files", self.name, stray, torn)

    def _index_dir(self, d1: str, found: list[tuple[int, ObjectKey, int]]) -> tuple[int, int]:
        """Add the object files under top-level directory ``d1`` to ``found``; returns the
        stray temp files and torn files it removed."""
        stray = torn = 0
        for d2 in _subdirs(d1):
            self._dirs.add(d2)
            with os.scandir(d2) as entries:
                for entry in entries:
                    if _TEMP.fullmatch(entry.name):
                        stray += _unlink(entry.path)
                        continue
                    m = _OBJECT.fullmatch(entry.name)
                    if m is None or not entry.is_file(follow_symlinks=False):
                        continue  # not ours
                    key = ObjectKey(bytes.fromhex(m.group(1)))
                    if self.path_of(key) != entry.path:
                        continue  # misplaced: not where we would look for it
                    st = entry.stat(follow_symlinks=False)
                    if st.st_size < HEADER_SIZE:
                        torn += _unlink(entry.path)
                        continue
                    found.append((st.st_mtime_ns, key, st.st_size))
        return stray, torn

    def _ensure_dir(self, directory: str) -> None:
        if directory not in self._dirs:
            os.makedirs(directory, exist_ok=True)
            self._dirs.add(directory)

    # ----- operations --------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise L2Error(f"{self.name}: adapter is closed")

    def put(self, key: ObjectKey, data: memoryview | bytes) -> None:
        check_key(key)
        self._check_open()
        view = byte_view(data)
        size = HEADER_SIZE + len(view)
        if self.capacity_bytes is not None and size > self.capacity_bytes:
            self._health.add("rejected")
            return
        header = header_for(key, view).pack()
        path = self.path_of(key)
        directory = os.path.dirname(path)
        temp = os.path.join(directory, f".{key.hex()}.{secrets.token_hex(6)}.tmp")
        try:
            try:
                self._ensure_dir(directory)
                fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            except FileNotFoundError:  # the directory was removed under us
                self._dirs.discard(directory)
                self._ensure_dir(directory)
                fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                _writev_all(fd, [memoryview(header), view])
            finally:
                os.close(fd)
            with self._lock:
                os.replace(temp, path)
                self._drop_locked(self._index.put(key, size))
        except OSError as exc:
            _unlink(temp)
            raise self._health.failed(f"{self.name}: put", exc) from exc
        self._health.add("puts")
        self._health.ok()

    def _drop_locked(self, evicted: list[tuple[ObjectKey, int]]) -> None:
        """Remove the files the capacity index evicted (it has forgotten them already)."""
        for key, _ in evicted:
            self._health.add("evictions")
            try:
                os.unlink(self.path_of(key))
            except FileNotFoundError:
                pass
            except OSError as exc:  # the index forgets it anyway: capacity must hold
                self._health.failed(f"{self.name}: evict", exc)

    def exists(self, keys: Sequence[ObjectKey]) -> list[bool]:
        self._check_open()
        with self._lock:
            return [k in self._index for k in keys]

    def get_into(self, key: ObjectKey, out: memoryview) -> bool:
        check_key(key)
        self._check_open()
        out = byte_view(out)
        with self._lock:
            known = key in self._index
        if not known:
            self._health.add("misses")
            return False
        path = self.path_of(key)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:  # removed behind our back
            with self._lock:
                if not os.path.exists(path):
                    self._forget_locked(key)
            self._health.add("misses")
            return False
        except OSError as exc:
            raise self._health.failed(f"{self.name}: get", exc) from exc
        try:
            st = os.fstat(fd)
            header, good = None, False
            if st.st_size == HEADER_SIZE + len(out):
                head = bytearray(HEADER_SIZE)
                header = unpack_header(head, key) if _read_into(fd, head) else None
            if header is not None and header.payload_len == len(out):
                h = hasher()
                good = _read_into(fd, out, h) and h.intdigest() == header.checksum
            if good and _CAN_TOUCH_FD:
                os.utime(fd)  # recency that survives a restart
        except OSError as exc:
            raise self._health.failed(f"{self.name}: get", exc) from exc
        finally:
            os.close(fd)
        if not good:
            self._discard(key, path, st.st_ino)
            self._health.add("corrupted")
            self._health.add("misses")
            return False
        with self._lock:
            self._index.touch(key)
        self._health.add("hits")
        self._health.ok()
        return True

    def _discard(self, key: ObjectKey, path: str, inode: int) -> None:
        """Delete a bad object, unless a put replaced the file since we read it."""
        with self._lock:
            try:
                if os.stat(path).st_ino != inode:
                    return
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                self._health.failed(f"{self.name}: delete corrupt object", exc)
            self._forget_locked(key)
        logger.warning("%s: object %s failed verification; deleted", self.name, key.hex())

    def _forget_locked(self, key: ObjectKey) -> None:
        self._index.pop(key)

    def delete(self, key: ObjectKey) -> None:
        check_key(key)
        self._check_open()
        with self._lock:
            try:
                os.unlink(self.path_of(key))
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise self._health.failed(f"{self.name}: delete", exc) from exc
            self._forget_locked(key)

    def clear(self) -> int:
        """Delete the indexed object files; anything else in the directory stays."""
        self._check_open()
        removed = 0
        with self._lock:
            try:
                for key in list(self._index):
                    self._index.pop(key)
                    removed += _unlink(self.path_of(key), strict=True)
            except OSError as exc:
                raise self._health.failed(f"{self.name}: clear", exc) from exc
        return removed

    def stats(self) -> dict[str, Any]:
        with self._lock:
            objects, nbytes = len(self._index), self._index.bytes
        return {
            "type": "fs",
            "name": self.name,
            "path": self.root,
            "objects": objects,
            "bytes": nbytes,
            "capacity_bytes": self.capacity_bytes,
            "eviction_policy": self._index.policy.name,
            **self._health.snapshot(),
        }

    def close(self) -> None:
        self._closed = True


def _subdirs(path: str) -> list[str]:
    with os.scandir(path) as entries:
        return [
            e.path for e in entries if _FAN.fullmatch(e.name) and e.is_dir(follow_symlinks=False)
        ]


def _unlink(path: str, strict: bool = False) -> int:
    """1 if ``path`` was removed, 0 if it was already gone (or, unless strict, not removable)."""
    try:
        os.unlink(path)
        return 1
    except FileNotFoundError:
        return 0
    except OSError:
        if strict:
            raise
        return 0


def _writev_all(fd: int, buffers: list[memoryview]) -> None:
    while buffers:
        n = os.writev(fd, buffers)
        _consume(buffers, n)


def _read_into(fd: int, buf: bytearray | memoryview, h: xxhash.xxh3_64 | None = None) -> bool:
    """Fill ``buf`` from ``fd`` (False at an early EOF), hashing each piece as it lands."""
    view, start = memoryview(buf), 0
    while start < len(view):
        piece = view[start : start + CHUNK]
        n = os.readv(fd, [piece])
        if n == 0:
            return False
        if h is not None:
            h.update(piece[:n])
        start += n
    return True


def _consume(buffers: list[memoryview], n: int) -> None:
    """Drop the first ``n`` bytes from a list of buffers (after a short readv/writev)."""
    while buffers and n >= len(buffers[0]):
        n -= len(buffers[0])
        buffers.pop(0)
    if n:
        buffers[0] = buffers[0][n:]
