"""The engine side of the chaos run (tests/chaos.py): one process per engine, its prompts
and the content every chunk must have.

Chunk k of a prompt holds bytes that are a pure function of the prompt's tokens up to the
end of chunk k (numpy seeded with their sha256), so any engine can verify any chunk. An
engine reports its counters and its current phase through lock-free shared memory, so a
SIGKILL never leaves a lock held.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import signal
import time
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from lmcache.client import LMCacheClient, ModelFields
from lmcache.engine.shm_kv import ShmKVCache
from lmcache.errors import ServerError, ServerUnavailableError, UnknownEngineError
from lmcache.protocol.messages import KVLayout, LayerPlacement, WorkerCopy
from lmcache.storage.shm import ShmSegment

T = TypeVar("T")
CHUNK, BLOCK, LAYERS, BLOCK_BYTES = 256, 16, 8, 2048  # chunk: the server's default
BPC, PLANE, NUM_BLOCKS = CHUNK // BLOCK, BLOCK_BYTES // 2, 256  # a prompt: <= 7 chunks
CHUNK_SHAPE, CHUNK_BYTES = (LAYERS, 2, BPC, PLANE), LAYERS * BPC * BLOCK_BYTES  # 256 KiB
MODEL: ModelFields = {"model_name": "chaos", "world_size": 1, "dtype": "bfloat16"}
MODES = ("engine_driven", "lmcache_driven", "bytes")
OPS = ("lookup", "store", "retrieve")
OUTCOMES = ("ok", "no_space", "miss", "transfer_failed", "unknown_engine", "bad_request",
            "forbidden", "internal", "other", "unavailable")  # fmt: skip
EXTRAS = ("verified_chunks", "verified_bytes", "wrong_bytes", "skip_overwrites",
          "lookup_hit_tokens", "reregistered")  # fmt: skip
N_OPS = len(OPS) * len(OUTCOMES)  # counters: (op, outcome), then the extras
PHASES = ("starting", "idle", "lookup", "store", "store_copy", "retrieve", "retrieve_copy")
STARTING, IDLE, LOOKUP, STORE, STORE_COPY, RETRIEVE, RETRIEVE_COPY = range(len(PHASES))


def kv_layout() -> KVLayout:
    """The layout `ShmKVCache` gives these dimensions (WorkerCopy engines share no memory)."""
    layer = BLOCK_BYTES * NUM_BLOCKS
    return KVLayout(
        num_layers=LAYERS, num_blocks=NUM_BLOCKS, block_size=BLOCK, block_bytes=BLOCK_BYTES,
        block_stride=PLANE, layers=[LayerPlacement(0, i * layer) for i in range(LAYERS)],
        planes=2, plane_stride=NUM_BLOCKS * PLANE,
    )  # fmt: skip


def random_tokens(rng: np.random.Generator, chunks: int) -> np.ndarray:
    return rng.integers(0, 50_000, CHUNK * chunks, np.uint32)


def prompt_pool() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Prefixes (1-4 chunks) and suffixes (1-3 chunks), the same in every process."""
    rng = np.random.default_rng(0)
    prefixes = [random_tokens(rng, int(rng.integers(1, 5))) for _ in range(6)]
    return prefixes, [random_tokens(rng, int(rng.integers(1, 4))) for _ in range(32)]


def expected_chunks(tokens: np.ndarray, first: int, last: int) -> list[np.ndarray]:
    """Chunks [first, last): chunk k is numpy seeded with sha256(tokens[: (k + 1) * CHUNK])."""
    h, out = hashlib.sha256(tokens[: first * CHUNK].tobytes()), []
    for k in range(first, last):
        h.update(tokens[k * CHUNK : (k + 1) * CHUNK].tobytes())
        rng = np.random.default_rng(int.from_bytes(h.copy().digest()[:16], "little"))
        out.append(np.frombuffer(rng.bytes(CHUNK_BYTES), np.uint8).reshape(CHUNK_SHAPE))
    return out


# ----- an engine process -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EngineSpec:
    port: int
    instance_id: int
    mode: str
    seed: int
    shm_dir: str  # the run's own LMCACHE_SHM_DIR: no other server cleans it up for us
    log: str  # mismatches and crashes are written here (survives a SIGKILL)


class Engine:
    def __init__(self, spec: EngineSpec, counters: Any, phase: Any) -> None:
        self.spec, self.iid, self.counters, self.phase = spec, spec.instance_id, counters, phase
        self.rng = np.random.default_rng(spec.seed)
        self.prefixes, self.suffixes = prompt_pool()
        self.kv = None
        if spec.mode == "engine_driven":
            self.kv = ShmKVCache(
                num_layers=LAYERS, num_blocks=NUM_BLOCKS, block_size=BLOCK, block_bytes=BLOCK_BYTES
            )
        self.blocks = self.kv.blocks if self.kv else np.zeros((LAYERS, 2, NUM_BLOCKS, PLANE), "u1")
        self.client = LMCacheClient.connect("localhost", spec.port, timeout=30)
        self.pool: ShmSegment | None = None
        self.register()
        self.phase.value = IDLE

    def register(self) -> None:
        memory = self.kv.memory if self.kv else WorkerCopy()
        self.client.register(self.iid, rank=0, layout=kv_layout(), memory=memory, **MODEL)
        if self.spec.mode == "lmcache_driven" and self.pool is None:
            pong = self.client.ping(self.iid)
            self.pool = ShmSegment.attach(pong.l1_pool, bytes.fromhex(pong.l1_pool_seal))

    def add(self, name: str, n: int = 1) -> None:
        self.counters[N_OPS + EXTRAS.index(name)] += n  # one writer per array: no lock

    def run(self, stop: Any) -> None:
        n = 0
        while not stop.value:
            self.one_request(f"chaos-{self.iid}-{n}")
            n += 1
        with contextlib.suppress(ServerError, ServerUnavailableError):
            self.client.unregister(self.iid)
        self.client.close()
        if self.pool is not None:
            self.pool.close()
        if self.kv is not None:
            self.kv.close()

    def one_request(self, rid: str) -> None:
        rng, prefix = self.rng, self.prefixes[self.rng.integers(len(self.prefixes))]
        fresh = rng.random() < 0.2  # a suffix nobody has seen: new chunks, evictions
        suffix = random_tokens(rng, 2) if fresh else self.suffixes[rng.integers(32)]
        tail = rng.integers(0, 50_000, int(rng.integers(0, CHUNK)), np.uint32)
        tokens = np.concatenate([prefix, suffix, tail])
        full = len(tokens) // CHUNK * CHUNK
        hit = self.call("lookup", LOOKUP, lambda: self.client.lookup(rid, tokens, **MODEL) or 0)
        if hit:
            self.add("lookup_hit_tokens", hit)
            self.call("retrieve", RETRIEVE, lambda: self.retrieve(rid, tokens, hit))
        if hit is not None and hit < full:
            self.call("store", STORE, lambda: self.store(rid, tokens, hit, full))
        with contextlib.suppress(ServerError, ServerUnavailableError):
            self.client.end_session(rid)

    def call(self, op: str, phase: int, fn: Callable[[], T]) -> T | None:
        """Run one operation and count its outcome (a str result names it, else "ok")."""
        self.phase.value = phase
        result: T | None = None
        try:
            result = fn()
            outcome = result if isinstance(result, str) else "ok"
        except ServerError as exc:
            outcome = exc.code if exc.code in OUTCOMES else "other"
        except ServerUnavailableError:
            outcome = "unavailable"
        self.phase.value = IDLE
        self.counters[OPS.index(op) * len(OUTCOMES) + OUTCOMES.index(outcome)] += 1
        if outcome == UnknownEngineError.code:  # reaped meanwhile (silent?): register again
            with contextlib.suppress(ServerError, ServerUnavailableError):
                self.register()
                self.add("reregistered")
        return result

    def chunk_ids(self, chunks: int) -> np.ndarray:
        return self.rng.permutation(NUM_BLOCKS)[: chunks * BPC]  # shuffled, as a paged allocator

    def store(self, rid: str, tokens: np.ndarray, start: int, end: int) -> str:
        c, iid = self.client, self.iid
        chunks = expected_chunks(tokens, start // CHUNK, end // CHUNK)
        if self.spec.mode == "bytes":
            reply = c.store_bytes(rid, iid, tokens, start=start, end=end, chunks=chunks)
            return "no_space" if reply.no_space else "ok"
        ids = self.chunk_ids(len(chunks))
        self.blocks[:, :, ids] = np.concatenate(chunks, axis=2)
        if self.spec.mode == "engine_driven":
            reply = c.store(rid, iid, tokens, start=start, end=end, block_ids=ids.tolist())
            return "no_space" if reply.no_space else "ok"
        assert self.pool is not None
        prep = c.prepare_store(rid, iid, tokens, start=start, end=end)
        self.phase.value = STORE_COPY
        for i, off in enumerate(prep.offsets):
            if off >= 0:  # -1: cached already
                dst = self.pool.array[off : off + prep.chunk_bytes].reshape(CHUNK_SHAPE)
                dst[...] = self.blocks[:, :, ids[i * BPC : (i + 1) * BPC]]
        self.phase.value = STORE
        c.commit(iid, prep.transfer_id)
        return "no_space" if prep.no_space else "ok"

    def retrieve(self, rid: str, tokens: np.ndarray, hit: int) -> str:
        n, skip, poison = hit // CHUNK, 0, int(self.rng.integers(256))
        if self.spec.mode == "bytes":
            frames = self.client.retrieve_bytes(rid, self.iid, tokens, start=0, end=hit)
            got = [np.frombuffer(f, np.uint8).reshape(CHUNK_SHAPE) for f in frames]
            return self.verify(rid, tokens, np.concatenate(got, axis=2), 0, poison)
        ids = self.chunk_ids(n)
        self.blocks[:, :, ids] = poison  # what the server must not write stays so
        if self.spec.mode == "engine_driven":
            skip = int(self.rng.integers(0, n * BPC)) * BLOCK if self.rng.random() < 0.3 else 0
            got_tokens = self.client.retrieve(
                rid, self.iid, tokens, start=0, end=hit, block_ids=ids.tolist(), skip_tokens=skip
            )
        else:
            assert self.pool is not None
            prep = self.client.prepare_retrieve(rid, self.iid, tokens, start=0, end=hit)
            self.phase.value = RETRIEVE_COPY
            for i, off in enumerate(prep.offsets):
                src = self.pool.array[off : off + prep.chunk_bytes].reshape(CHUNK_SHAPE)
                self.blocks[:, :, ids[i * BPC : (i + 1) * BPC]] = src
            self.phase.value = RETRIEVE
            got_tokens = self.client.commit(self.iid, prep.transfer_id)  # only now trusted
        if got_tokens != hit - skip:  # a success that moved less than asked: a bug
            return "other"
        return self.verify(rid, tokens, self.blocks[:, :, ids], skip // BLOCK, poison)

    def verify(self, rid: str, tokens: np.ndarray, got: np.ndarray, skip: int, poison: int) -> str:
        """``got``: every retrieved chunk, blocks in order; the first ``skip`` blocks were
        skipped and must still hold ``poison``."""
        want = np.concatenate(expected_chunks(tokens, 0, got.shape[2] // BPC), axis=2)
        wrong = int(np.count_nonzero(got[:, :, skip:] != want[:, :, skip:]))
        overwritten = int(np.count_nonzero(got[:, :, :skip] != poison))
        self.add("verified_chunks", got.shape[2] // BPC)
        self.add("verified_bytes", got[:, :, skip:].size)
        self.add("wrong_bytes", wrong)
        self.add("skip_overwrites", overwritten)
        if wrong or overwritten:
            bad = np.flatnonzero((got != want).any(axis=(0, 1, 3))).tolist()
            with open(self.spec.log, "a") as f:
                f.write(
                    f"{time.time():.3f} {self.spec.mode} {rid}: {wrong} wrong bytes, {overwritten}"
                    f" skipped bytes written; blocks {bad} of {got.shape[2]} differ (skip {skip})\n"
                )
        return "ok"


def engine_main(spec: EngineSpec, counters: Any, phase: Any, stop: Any) -> None:
    os.environ["LMCACHE_SHM_DIR"] = spec.shm_dir
    engines: list[Engine] = []

    def shrink_and_exit(signum: int, frame: Any) -> None:
        """SIGUSR1: truncate our own KV segment in the middle of whatever we do, as a buggy
        engine might, and leave (our memory is gone). The server's copy must fail cleanly."""
        if engines and engines[0].kv is not None:
            os.ftruncate(engines[0].kv.segment.fd, 4096)
        os._exit(0)

    signal.signal(signal.SIGUSR1, shrink_and_exit)
    try:
        engines.append(Engine(spec, counters, phase))
        engines[0].run(stop)
    except BaseException:
        with open(spec.log, "a") as f:
            f.write(traceback.format_exc())
        raise SystemExit(1) from None
