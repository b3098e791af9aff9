"""What the fuzzers work with: the real values of the module's server (its engine's
segment, seal and layout, the L1 pool, another engine's segment, names that are no
segment) for the strategies to draw, and the state the fuzzing leaves open (sessions,
prepared transfers, engines it registered) for the checks to follow and close."""

from __future__ import annotations

import os
from typing import Any

from lmcache.engine.shm_kv import ShmKVCache
from lmcache.protocol.messages import KVLayout, Pong
from lmcache.storage.shm_names import shm_path

from ..conftest import CHUNK
from .wire import ENGINE_ID, REAL_CHUNK_BYTES


class Corpus:
    """Real values for the strategies to draw, and what the fuzzing left open."""

    def __init__(self, tokens: list[bytes], kv: ShmKVCache, pool: Pong, foreign: ShmKVCache):
        self.tokens = tokens  # 3 chunks + a tail each; the first two chunks of two are cached
        self.segment, self.seal = kv.memory.segments[0], kv.memory.tokens[0]  # the real engine
        self.layout = kv.layout  # ... and its layout
        self.pool, self.pool_seal = pool.l1_pool, pool.l1_pool_seal  # the server's L1 pool
        self.foreign, self.foreign_seal = foreign.memory.segments[0], foreign.memory.tokens[0]
        # Names under the segment directory that are not segments to map: a file of the
        # right size with no seal, a symlink to the real segment, a directory, a FIFO.
        self.unsealed, self.link, self.directory, self.fifo = (
            f"lmcache_fuzz_{what}_{os.getpid()}" for what in ("unsealed", "link", "dir", "fifo")
        )
        self.sealed = {  # every segment that exists, by path, with its seal
            shm_path(self.segment): bytes.fromhex(self.seal),
            shm_path(self.pool): bytes.fromhex(self.pool_seal),
            shm_path(self.foreign): bytes.fromhex(self.foreign_seal),
        }
        self.lookup_ids: set[str] = set()  # sessions to end after the fuzzing
        self.transfers: dict[int, int] = {}  # open prepared transfers: id -> engine
        self.engines: dict[int, KVLayout] = {}  # engines the fuzzers registered

    def chunk_bytes(self, instance_id: Any) -> int | None:
        if instance_id == ENGINE_ID:
            return REAL_CHUNK_BYTES
        lay = self.engines.get(instance_id)
        return None if lay is None else chunk_bytes_of(lay)

    def __repr__(self) -> str:  # hypothesis prints it with every failing example: keep it short
        return f"Corpus(segment={self.segment!r})"


def chunk_bytes_of(lay: KVLayout) -> int:
    """The bytes of one chunk in layout ``lay``."""
    return lay.num_layers * (CHUNK // lay.block_size) * lay.block_bytes
