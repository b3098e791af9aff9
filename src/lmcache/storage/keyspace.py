"""The one owner of cache keys: lookups, stores, retrieves and L2 all ask `KeySpace`.

    Namespace (model, world size, rank, dtype, kv_spec, salt) ──digest──> 16 B  ┐
      (KV shared by every rank, e.g. MLA: neither rank nor world size)          │
    tokens ──ChunkHasher──> h0, h1, h2 ... (chained, 32 B each)                 ├─> key = digest ‖ h
    key + the writer's chunk layout tag ──l2_key──> the object's name in L2     ┘

A lookup and the retrieve that follows it must derive the same bytes for the same chunk,
or a hit turns into a miss (or worse, a store lands under a key nobody looks up). They
used to be computed in three places with three memos; now every caller goes through here,
so a change to how keys are made is one change.

Both memos are bounded: namespace digests (a tenant per ``cache_salt`` can mint many) and
hash chains of recent prompts (`ChunkHasher`, by bytes).
"""

from __future__ import annotations

import hashlib
import threading

from lmcache.errors import BadRequestError
from lmcache.storage.keys import TOKEN_BYTES, ChunkHasher, Namespace, shares_kv
from lmcache.types import ObjectKey

MAX_MEMO_DIGESTS = 1 << 16  # namespace digests remembered (~6 MB at most)


def l2_key(key: ObjectKey, tag: bytes) -> ObjectKey:
    """The L2 name of an L1 object: its key with the writer's layout folded into the
    namespace part, so an engine never loads bytes of another layout of the same size."""
    return ObjectKey(hashlib.sha256(key[:16] + tag).digest()[:16] + key[16:])


class KeySpace:
    def __init__(self, hasher: ChunkHasher) -> None:
        self.hasher = hasher
        self.chunk_size = hasher.chunk_size
        self._digests: dict[Namespace, bytes] = {}
        self._rank_digests: dict[tuple[str, int, str, str, str], list[bytes]] = {}
        self._memo_size = 0  # digests held by both memos together
        self._lock = threading.Lock()  # lookups on the loop thread, copies on the pool

    # ----- namespaces -------------------------------------------------------------------

    def digest(self, ns: Namespace) -> bytes:
        """The 16-byte prefix of every key in namespace ``ns`` (memoized)."""
        digest = self._digests.get(ns)
        if digest is None:
            digest = ns.digest
            with self._lock:
                self._make_room(1)
                self._digests[ns] = digest
        return digest

    def rank_digests(
        self, model_name: str, world_size: int, dtype: str, kv_spec: str, cache_salt: str
    ) -> list[bytes]:
        """Every rank's digest of one model identity: a lookup asks for all ranks at once.
        KV shared by every rank (`shares_kv`) has one digest: one key per chunk, which
        every rank reads."""
        ident = (model_name, world_size, dtype, kv_spec, cache_salt)
        digests = self._rank_digests.get(ident)
        if digests is None:
            ranks = 1 if shares_kv(kv_spec) else world_size
            digests = [
                Namespace(model_name, world_size, rank, dtype, kv_spec, cache_salt).digest
                for rank in range(ranks)
            ]
            with self._lock:
                self._make_room(ranks)
                self._rank_digests[ident] = digests
        return digests

    def _make_room(self, n: int) -> None:
        # Bounded by digests, not entries (ranks vary); dropping all is cheap to redo.
        if self._memo_size + n > MAX_MEMO_DIGESTS:
            self._digests.clear()
            self._rank_digests.clear()
            self._memo_size = 0
        self._memo_size += n

    # ----- keys -------------------------------------------------------------------------

    def range_keys(
        self, digest: bytes, tokens: bytes, start: int, end: int, block_size: int = 0
    ) -> list[ObjectKey]:
        """Keys of the chunks ``[start, end)`` of a prompt: whole chunks, then (if ``end`` is
        not chunk-aligned) the partial chunk of its last ``end % chunk_size`` tokens, which
        must be whole blocks of ``block_size`` tokens (0: whole chunks only). BadRequestError
        if the range is misaligned or the tokens do not reach it."""
        c = self.chunk_size
        tail = end % c
        if end < start or start % c or (tail and (block_size <= 0 or tail % block_size)):
            raise BadRequestError(
                f"token range [{start}, {end}) must be chunk-aligned (chunk size {c}), or end "
                f"on a whole block (block size {block_size}) inside its last chunk"
            )
        sent = self._token_count(tokens)
        if sent < end:
            raise BadRequestError(f"range ends at token {end} but only {sent} tokens sent")
        hashes = self.hasher.hashes(tokens, end // c)[start // c :]
        if tail:
            hashes.append(self.hasher.partial_hashes(tokens, end // c, tail, 1)[0])
        return [ObjectKey(digest + h) for h in hashes]

    def tail_groups(
        self, digests: list[bytes], tokens: bytes, chunk: int, block_size: int
    ) -> list[tuple[int, list[ObjectKey]]]:
        """Candidates for a lookup's partial last chunk at whole-chunk position ``chunk``:
        (tokens covered, every rank's key), longest first, for every whole number of blocks
        short of a chunk that the tokens reach."""
        c = self.chunk_size
        if block_size <= 0 or c % block_size:
            raise BadRequestError(
                f"block_size {block_size} must divide the server's chunk size {c}"
            )
        room = self._token_count(tokens) - chunk * c
        most = min(c // block_size - 1, room // block_size)
        hashes = self.hasher.partial_hashes(tokens, chunk, block_size, max(0, most))
        groups = [(m * block_size, [ObjectKey(d + h) for d in digests])
                  for m, h in enumerate(hashes, 1)]  # fmt: skip
        return groups[::-1]

    def prompt_keys(self, digests: list[bytes], tokens: bytes) -> list[list[ObjectKey]]:
        """For each whole chunk of a prompt, its key in every rank's namespace."""
        hashes = self.hasher.hashes(tokens, self._token_count(tokens) // self.chunk_size)
        if len(digests) == 1:  # the common case, without an inner comprehension per chunk
            only = digests[0]
            return [[ObjectKey(only + h)] for h in hashes]
        return [[ObjectKey(d + h) for d in digests] for h in hashes]

    @staticmethod
    def _token_count(tokens: bytes) -> int:
        if len(tokens) % TOKEN_BYTES:
            raise BadRequestError("tokens must be little-endian uint32 (a multiple of 4 bytes)")
        return len(tokens) // TOKEN_BYTES
