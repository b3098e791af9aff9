"""Chunk keys: a chained hash over token chunks, prefixed by a namespace digest.

    tokens:  |---- chunk 0 ----|---- chunk 1 ----|---- chunk 2 ----|-- tail --|
    hashes:   h0 = H(seed, c0)  h1 = H(h0, c1)    h2 = H(h1, c2)     (never stored)
    keys:     ns ‖ h0           ns ‖ h1           ns ‖ h2

Chaining makes a chunk's key depend on every token before it, so equal keys mean
equal prefixes. The namespace holds what must never be shared between entries
(model, KV world size and rank, dtype and layout, tenant salt); it is hashed to
16 bytes so every key is a flat 48-byte string that an L2 can store as is.

Tokens travel as little-endian uint32 bytes; hashing slices them without copies.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import msgspec

from lmcache.types import ChunkHash, ObjectKey

TOKEN_BYTES = 4
_SEED = b"lmcache-chunk-hash-v1"
MAX_SALT_LEN = 256


def _hasher(algorithm: str) -> Callable[[], Any]:
    if algorithm == "sha256":
        return hashlib.sha256
    if algorithm == "blake2b":
        return lambda: hashlib.blake2b(digest_size=32)
    raise ValueError(f"unknown hash algorithm {algorithm!r}")


@dataclass(frozen=True, slots=True)
class Namespace:
    """Everything that separates caches that must never share an entry."""

    model_name: str
    world_size: int
    rank: int
    dtype: str
    kv_spec: str
    cache_salt: str = ""

    @property
    def digest(self) -> bytes:
        fields = (
            self.model_name,
            self.world_size,
            self.rank,
            self.dtype,
            self.kv_spec,
            self.cache_salt,
        )
        return hashlib.sha256(msgspec.msgpack.encode(fields)).digest()[:16]


class ChunkHasher:
    def __init__(self, chunk_size: int, algorithm: str = "sha256") -> None:
        self.chunk_size = chunk_size
        self.algorithm = algorithm
        self._new = _hasher(algorithm)
        seed = self._new()
        seed.update(_SEED)
        self._seed = seed.digest()

    def hashes(self, tokens: bytes, num_chunks: int) -> list[ChunkHash]:
        """Hashes of the first ``num_chunks`` whole chunks of ``tokens`` (uint32 LE)."""
        return list(self.iter_hashes(tokens, num_chunks))

    def iter_hashes(self, tokens: bytes, num_chunks: int) -> Iterator[ChunkHash]:
        """Like `hashes`, one chunk at a time (callers may stop early)."""
        step = self.chunk_size * TOKEN_BYTES
        if num_chunks * step > len(tokens):  # checked now, not at the first next()
            raise ValueError(
                f"{num_chunks} chunks need {num_chunks * self.chunk_size} tokens, "
                f"got {len(tokens) // TOKEN_BYTES}"
            )
        return self._chain(memoryview(tokens), step, num_chunks)

    def _chain(self, view: memoryview, step: int, num_chunks: int) -> Iterator[ChunkHash]:
        prev = self._seed
        for i in range(num_chunks):
            h = self._new()
            h.update(prev)
            h.update(view[i * step : (i + 1) * step])
            prev = h.digest()
            yield ChunkHash(prev)


def object_key(namespace_digest: bytes, chunk_hash: ChunkHash) -> ObjectKey:
    return ObjectKey(namespace_digest + chunk_hash)
