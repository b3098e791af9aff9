"""The fuzz package's fixtures. Each test module gets its own server (module scope): the
fuzzers' server (``fuzz_server``, with the real engine ``kv`` registered, the ``corpus``
seeded and a raw ``wire`` to it), whose state the last fuzzer checks for leaks, and the
regressions' ``probe_server``, so that what they register and store does not meet the
fuzzing. A module whose server needs other flags overrides ``fuzz_server``."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from lmcache.engine.shm_kv import ShmKVCache
from lmcache.protocol.messages import encode_tokens
from lmcache.storage.shm_names import shm_path

from ..conftest import (
    BLOCK,
    CHUNK,
    ServerProcess,
    fill_random,
    register,
    start_server,
    unique_tokens,
)
from .corpus import Corpus
from .wire import ENGINE_ID, LOCK_TTL_S, Wire


def engine_cache() -> ShmKVCache:
    """An engine's KV cache of the real engine's shape (`REAL_CHUNK_BYTES` a chunk)."""
    return ShmKVCache(num_layers=4, num_blocks=64, block_size=BLOCK, block_bytes=2048, planes=2)


@pytest.fixture(scope="module")
def fuzz_server() -> Iterator[ServerProcess]:
    s = start_server("--lock-ttl-s", str(LOCK_TTL_S))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def kv(fuzz_server: ServerProcess) -> Iterator[ShmKVCache]:
    cache = engine_cache()
    fill_random(cache, 7)
    register(fuzz_server.client(), cache, ENGINE_ID)
    yield cache
    cache.close()


@pytest.fixture(scope="module")
def wire(fuzz_server: ServerProcess) -> Iterator[Wire]:
    w = Wire(fuzz_server.port)
    yield w
    w.close()


@pytest.fixture(scope="module")
def corpus(fuzz_server: ServerProcess, kv: ShmKVCache) -> Iterator[Corpus]:
    seqs = [unique_tokens(3 * CHUNK + 5) for _ in range(3)]
    seqs.append(np.concatenate([seqs[0][:CHUNK], unique_tokens(2 * CHUNK + 5)]))  # shares chunk 0
    client = fuzz_server.client()
    for seq in seqs[:2]:
        client.store("seed", ENGINE_ID, seq, start=0, end=2 * CHUNK, block_ids=range(32))
    # Another engine's segment, as big as the real one (its own seal), and things that are
    # not segments: see `Corpus`.
    foreign = engine_cache()
    c = Corpus([encode_tokens(s) for s in seqs], kv, client.ping(), foreign)
    Path(shm_path(c.unsealed)).write_bytes(bytes(2 * foreign.segment.size))
    Path(shm_path(c.link)).symlink_to(shm_path(c.segment))
    Path(shm_path(c.directory)).mkdir()
    os.mkfifo(shm_path(c.fifo), 0o600)
    yield c
    for name in (c.unsealed, c.link, c.fifo):
        Path(shm_path(name)).unlink()
    Path(shm_path(c.directory)).rmdir()
    foreign.close()


@pytest.fixture(scope="module")
def probe_server() -> Iterator[tuple[ServerProcess, ShmKVCache]]:
    s = start_server()
    cache = engine_cache()
    register(s.client(), cache, ENGINE_ID)
    yield s, cache
    s.stop()
    cache.close()


@pytest.fixture
def probe_wire(probe_server: tuple[ServerProcess, ShmKVCache]) -> Iterator[Wire]:
    w = Wire(probe_server[0].port)
    yield w
    w.close()
