"""The header in front of every stored object, and its checksum.

    offset  size  field
         0     4  magic        b"LMKV"
         4     1  version      1
         5     1  checksum     1 = xxh3_64 of the payload
         6     2  header size  80 (lets a later version grow the header)
         8     8  payload length
        16     8  checksum value
        24     4  part size    Redis: bytes per part key (0 = not split)
        28     4  reserved     0
        32    48  object key   a file or Redis key renamed by hand is caught too
        80     -  payload      (fs, memory; Redis keeps it in separate part keys)

Little-endian. The checksum is xxh3_64 rather than zlib.crc32: it runs at several
GB/s where crc32 runs near 1 GB/s, and a read verifies every byte it returns, so
the checksum is on the critical path of every L2 hit.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import xxhash

from lmcache.types import ObjectKey

MAGIC = b"LMKV"
VERSION = 1
CHECKSUM_XXH3_64 = 1
_HEADER = struct.Struct("<4sBBHQQII48s")
HEADER_SIZE = _HEADER.size  # 80


# Readers hash what they just copied in pieces of this size, while the piece is still in
# the CPU cache: a second pass over a 40 MiB object from memory cost ~25% of a read.
CHUNK = 512 << 10


def checksum(data: memoryview | bytes) -> int:
    """xxh3_64 of ``data``; C code over the buffer, no copy."""
    return xxhash.xxh3_64_intdigest(data)


def hasher() -> xxhash.xxh3_64:
    """A streaming `checksum`: ``update`` piece by piece, then ``intdigest()``."""
    return xxhash.xxh3_64()


def copy_hashing(dst: memoryview, src: memoryview | bytes, h: xxhash.xxh3_64) -> None:
    """``dst[:] = src`` (same length), feeding every copied piece to ``h``."""
    src = memoryview(src)
    for start in range(0, len(src), CHUNK):
        dst[start : start + CHUNK] = src[start : start + CHUNK]
        h.update(dst[start : start + CHUNK])


@dataclass(frozen=True, slots=True)
class Header:
    key: ObjectKey
    payload_len: int
    checksum: int
    part_size: int = 0

    def pack(self) -> bytes:
        return _HEADER.pack(
            MAGIC,
            VERSION,
            CHECKSUM_XXH3_64,
            HEADER_SIZE,
            self.payload_len,
            self.checksum,
            self.part_size,
            0,
            self.key,
        )

    @property
    def parts(self) -> int:
        """How many part keys hold the payload (Redis)."""
        return -(-self.payload_len // self.part_size) if self.part_size else 0


def header_for(key: ObjectKey, payload: memoryview, part_size: int = 0) -> Header:
    return Header(key, len(payload), checksum(payload), part_size)


def unpack_header(buf: bytes | bytearray | memoryview | None, key: ObjectKey) -> Header | None:
    """The header at the start of ``buf``, or None if it is not a valid header for ``key``."""
    if buf is None or len(buf) < HEADER_SIZE:
        return None
    magic, version, algo, size, length, value, part_size, _, stored_key = _HEADER.unpack_from(buf)
    if (magic, version, algo, size) != (MAGIC, VERSION, CHECKSUM_XXH3_64, HEADER_SIZE):
        return None
    if stored_key != key:
        return None
    return Header(ObjectKey(stored_key), length, value, part_size)
