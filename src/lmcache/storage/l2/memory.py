"""`MemoryL2`: an in-process L2 for tests, with the same contract as the real ones.

    key ──> bytearray [ header (80 B) | payload ]      OrderedDict, least recent first

Objects keep the on-disk header and checksum, so a test can flip a byte in
``adapter._objects[key]`` and see the corruption path (miss + delete) that the
fs and Redis adapters take. With a capacity, the least recently used objects go
first; an object larger than the capacity is not stored (counted as ``rejected``).
Setting ``down = True`` makes every call raise `L2Error`, like an unreachable backend
(for tests of how the server degrades), until it is set back to False.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from lmcache.storage.capacity import CapacityIndex
from lmcache.storage.l2.base import (
    Health,
    L2Error,
    byte_view,
    capacity_bytes,
    check_key,
    policy_for,
)
from lmcache.storage.l2.format import (
    HEADER_SIZE,
    copy_hashing,
    hasher,
    header_for,
    unpack_header,
)
from lmcache.types import ObjectKey


class MemoryL2:
    def __init__(
        self, max_capacity_gb: float | None = None, name: str = "memory",
        eviction_policy: str = "LRU",
    ) -> None:  # fmt: skip
        self.name = name
        self.capacity_bytes = capacity_bytes("memory", max_capacity_gb)
        self._objects: dict[ObjectKey, bytearray] = {}
        # sizes, and which object goes first when over capacity
        self._index = CapacityIndex[ObjectKey](
            policy_for("memory", eviction_policy), self.capacity_bytes
        )
        self._lock = threading.Lock()
        self._health = Health()
        self._closed = False
        self.down = False

    def __repr__(self) -> str:
        return f"MemoryL2({self.name!r})"

    def _check_open(self, op: str) -> None:
        if self._closed:
            raise L2Error(f"{self.name}: adapter is closed")
        if self.down:
            raise self._health.failed(f"{self.name}: {op}", ConnectionError("backend is down"))
        self._health.ok()

    def put(self, key: ObjectKey, data: memoryview | bytes) -> None:
        check_key(key)
        self._check_open("put")
        view = byte_view(data)
        size = HEADER_SIZE + len(view)
        if self.capacity_bytes is not None and size > self.capacity_bytes:
            self._health.add("rejected")
            return
        blob = bytearray(size)
        blob[:HEADER_SIZE] = header_for(key, view).pack()
        blob[HEADER_SIZE:] = view
        with self._lock:
            self._objects[key] = blob
            for victim, _ in self._index.put(key, size):
                del self._objects[victim]
                self._health.add("evictions")
        self._health.add("puts")

    def exists(self, keys: Sequence[ObjectKey]) -> list[bool]:
        self._check_open("exists")
        with self._lock:
            return [k in self._objects for k in keys]

    def get_into(self, key: ObjectKey, out: memoryview) -> bool:
        check_key(key)
        self._check_open("get_into")
        out = byte_view(out)
        with self._lock:
            blob = self._objects.get(key)
            if blob is not None:
                self._index.touch(key)
        if blob is None:
            self._health.add("misses")
            return False
        payload = memoryview(blob)[HEADER_SIZE:]
        header = unpack_header(blob, key)
        good = False
        if header is not None and header.payload_len == len(payload) == len(out):
            h = hasher()
            copy_hashing(out, payload, h)
            good = h.intdigest() == header.checksum
        if not good:
            with self._lock:
                if self._objects.get(key) is blob:
                    del self._objects[key]
                    self._index.pop(key)
            self._health.add("corrupted")
            self._health.add("misses")
            return False
        self._health.add("hits")
        return True

    def delete(self, key: ObjectKey) -> None:
        self._check_open("delete")
        with self._lock:
            self._objects.pop(key, None)
            self._index.pop(key)

    def clear(self) -> int:
        self._check_open("clear")
        with self._lock:
            n = len(self._objects)
            self._objects.clear()
            self._index.clear()
        return n

    def stats(self) -> dict[str, Any]:
        with self._lock:
            objects, nbytes = len(self._objects), self._index.bytes
        return {
            "type": "memory",
            "name": self.name,
            "objects": objects,
            "bytes": nbytes,
            "capacity_bytes": self.capacity_bytes,
            "eviction_policy": self._index.policy.name,
            **self._health.snapshot(),
        }

    def close(self) -> None:
        self._closed = True
