"""Chunk keys: a chained hash over token chunks, prefixed by a namespace digest.

    tokens:  |---- chunk 0 ----|---- chunk 1 ----|---- chunk 2 ----|-- tail --|
    hashes:   h0 = H(seed, c0)  h1 = H(h0, c1)    h2 = H(h1, c2)   t = H(h2, P, blocks)
    keys:     ns ‖ h0           ns ‖ h1           ns ‖ h2          ns ‖ t

The tail's whole engine blocks (m of them, 0 < m < blocks per chunk) form a *partial
chunk*: it chains from the previous chunk's hash like a whole chunk, but hashes the
marker ``P`` (7 bytes) before its tokens. Every whole chunk hashes 32 + 4k bytes and
every partial chunk 32 + 7 + 4k, so no partial input ever equals a whole input: the two
kinds of key can only meet through a hash collision. Its length is implied by the token
count hashed, so partials of different lengths at one position have different keys.

Chaining makes a chunk's key depend on every token before it, so equal keys mean
equal prefixes. The namespace holds what must never be shared between entries
(model, KV world size and rank, dtype and layout, tenant salt); it is hashed to
16 bytes so every key is a flat 48-byte string that an L2 can store as is.

Tokens travel as little-endian uint32 bytes; hashing slices them without copies.

The same prompt is hashed again and again: by every lookup of a request that is
still waiting, then by its retrieve and its store (all send the same whole-chunk
tokens). Hashing costs ~2 us per chunk, most of a lookup's server time, so
`ChunkHasher` remembers the chains of recent prompts (bounded by bytes, LRU).
Entries are found by a cheap fingerprint and only used after a full byte
comparison, so a fingerprint collision costs a recomputation, never a wrong key.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import msgspec

from lmcache.defaults import HASH_MEMO_MB
from lmcache.types import ChunkHash, ObjectKey

TOKEN_BYTES = 4
_SEED = b"lmcache-chunk-hash-v1"
_PARTIAL = b"partial"  # 7 bytes: keeps partial-chunk inputs apart from whole ones (above)
MAX_SALT_LEN = 256
# A `kv_spec` field saying that every rank of the engine holds the same KV bytes: MLA's
# latent cache is replicated, not sharded, across tensor-parallel ranks. Its keys then
# carry neither rank nor world size: rank 0 writes each chunk once and every rank (of any
# TP size) reads it. The engine decides (it knows its attention); the server only reads
# the flag from the spec, so the protocol is unchanged.
SHARED_KV = "shared_kv"
DEFAULT_CACHE_BYTES = HASH_MEMO_MB << 20
_TAIL_BYTES = 256  # fingerprint: length + last 64 tokens (O(1), unlike hashing the prompt)
_ENTRY_OVERHEAD = 200  # bytes an entry costs beyond its tokens and hashes


def _hasher(algorithm: str) -> Callable[[], Any]:
    if algorithm == "sha256":
        return hashlib.sha256
    if algorithm == "blake2b":
        return lambda: hashlib.blake2b(digest_size=32)
    if algorithm == "blake3":  # upstream's default; a dependency of ours (pyproject)
        from blake3 import blake3

        return blake3
    raise ValueError(f"unknown hash algorithm {algorithm!r}")


def shares_kv(kv_spec: str) -> bool:
    """Whether ``kv_spec`` marks KV that is identical on every rank (`SHARED_KV`)."""
    return SHARED_KV in kv_spec.split(";")


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
    def shared(self) -> bool:
        """Every rank's keys are the same (`SHARED_KV`): rank and world size left out."""
        return shares_kv(self.kv_spec)

    @property
    def digest(self) -> bytes:
        # world size 0 never names a real engine, so shared and per-rank digests never meet
        world, rank = (0, 0) if self.shared else (self.world_size, self.rank)
        fields = (self.model_name, world, rank, self.dtype, self.kv_spec, self.cache_salt)
        return hashlib.sha256(msgspec.msgpack.encode(fields)).digest()[:16]


class ChunkHasher:
    def __init__(
        self, chunk_size: int, algorithm: str = "sha256", cache_bytes: int = DEFAULT_CACHE_BYTES
    ) -> None:
        self.chunk_size = chunk_size
        self.memo_bytes = cache_bytes  # --hash-memo-mb; 0 turns the memo off
        self._new = _hasher(algorithm)
        seed = self._new()
        seed.update(_SEED)
        self._seed = seed.digest()
        self._cache = _ChainCache(cache_bytes)

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
        known = self._cache.get(tokens)
        if len(known) >= num_chunks:
            return iter(known[:num_chunks])
        return self._chain(tokens, step, num_chunks, known)

    def partial_hashes(
        self, tokens: bytes, chunk: int, block_size: int, max_blocks: int
    ) -> list[ChunkHash]:
        """Hashes of the partial chunks at whole-chunk position ``chunk``: entry ``m - 1``
        covers that chunk's first ``m`` blocks of ``block_size`` tokens, m = 1..max_blocks.
        One pass: each longer partial continues the shorter one's hash state."""
        start = chunk * self.chunk_size * TOKEN_BYTES
        step = block_size * TOKEN_BYTES
        if block_size <= 0 or max_blocks < 0 or start + max_blocks * step > len(tokens):
            raise ValueError(
                f"{max_blocks} blocks of {block_size} tokens after chunk {chunk} need more "
                f"than the {len(tokens) // TOKEN_BYTES} tokens sent"
            )
        if max_blocks == 0:
            return []
        prev = self.hashes(tokens, chunk)[-1] if chunk else self._seed
        h = self._new()
        h.update(prev)
        h.update(_PARTIAL)
        view = memoryview(tokens)
        out = []
        for m in range(max_blocks):
            h.update(view[start + m * step : start + (m + 1) * step])
            out.append(ChunkHash(h.copy().digest()))
        return out

    def _chain(
        self, tokens: bytes, step: int, num_chunks: int, known: tuple[ChunkHash, ...]
    ) -> Iterator[ChunkHash]:
        yield from known
        view = memoryview(tokens)
        computed: list[ChunkHash] = []
        prev = known[-1] if known else self._seed
        try:
            for i in range(len(known), num_chunks):
                h = self._new()
                h.update(prev)
                h.update(view[i * step : (i + 1) * step])
                prev = ChunkHash(h.digest())
                computed.append(prev)
                yield prev
        finally:  # also when the caller stops early (a lookup stops at its first miss)
            if computed:
                self._cache.put(tokens, known + tuple(computed))


class _ChainCache:
    """Hash chains of recent prompts: fingerprint -> (tokens, hashes of its first chunks)."""

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._bytes = 0
        self._entries: dict[tuple[int, bytes], tuple[bytes, tuple[ChunkHash, ...]]] = {}
        self._lock = threading.Lock()  # lookups on the loop thread, copies on the pool

    @staticmethod
    def _cost(tokens: bytes, hashes: tuple[ChunkHash, ...]) -> int:
        return len(tokens) + 32 * len(hashes) + _ENTRY_OVERHEAD

    def get(self, tokens: bytes) -> tuple[ChunkHash, ...]:
        if type(tokens) is not bytes or not self._max_bytes:  # mutable buffers: never cached
            return ()
        fp = (len(tokens), tokens[-_TAIL_BYTES:])
        with self._lock:
            entry = self._entries.pop(fp, None)
            if entry is None:
                return ()
            self._entries[fp] = entry  # most recently used last
        return entry[1] if entry[0] == tokens else ()

    def put(self, tokens: bytes, hashes: tuple[ChunkHash, ...]) -> None:
        if type(tokens) is not bytes or self._cost(tokens, hashes) > self._max_bytes:
            return
        fp = (len(tokens), tokens[-_TAIL_BYTES:])
        with self._lock:
            old = self._entries.pop(fp, None)
            if old is not None:
                self._bytes -= self._cost(*old)
                if old[0] == tokens and len(old[1]) > len(hashes):
                    hashes = old[1]  # a concurrent caller got further down the same chain
            self._entries[fp] = (tokens, hashes)
            self._bytes += self._cost(tokens, hashes)
            while self._bytes > self._max_bytes:
                evicted = self._entries.pop(next(iter(self._entries)))
                self._bytes -= self._cost(*evicted)

    def __len__(self) -> int:
        return len(self._entries)


def object_key(namespace_digest: bytes, chunk_hash: ChunkHash) -> ObjectKey:
    return ObjectKey(namespace_digest + chunk_hash)
