"""The worker's transfer paths, one contract for all three, without vLLM.

A numpy KV layout in a shared-memory segment (`ShmKVCache`) stands in for vLLM's
tensors and a real `lmcache server` process answers. Each path is reached the way
the connector reaches it: `WorkerSide.register_memory` in ``engine_driven`` mode
(shared KV segments), in ``lmcache_driven`` mode (the server's L1 pool), and in
``lmcache_driven`` mode against a server whose /dev/shm is another directory, as on
another host (bytes in the messages, the automatic fallback).
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest

from lmcache.engine.shm_kv import ShmKVCache
from lmcache.engine.transfer import BlockCopier
from lmcache.errors import CacheMissError, UnknownEngineError
from lmcache.integration.vllm.config import ConnectorConfig, TransferMode
from lmcache.integration.vllm.identity import CacheIdentity
from lmcache.integration.vllm.link import ServerLink
from lmcache.integration.vllm.metadata import LoadSpec, Metadata, ParallelStrategy, StoreSpec
from lmcache.integration.vllm.transfer_paths import (
    BytesPath,
    Held,
    PoolPath,
    SharedKVPath,
    TransferPath,
)
from lmcache.integration.vllm.worker import WorkerSide
from lmcache.protocol.messages import KVMemory, WorkerCopy
from lmcache.storage.shm_names import shm_path

from .conftest import BLOCK, CHUNK, ServerProcess, fill_random, start_server, unique_tokens

BPC = CHUNK // BLOCK  # blocks per chunk
IDENTITY = CacheIdentity(
    model_name="paths", world_size=1, dtype="bfloat16", kv_spec="numpy", block_size=BLOCK
)
SENTINEL = 0xAB


@pytest.fixture(scope="module")
def far_server() -> Iterator[ServerProcess]:
    """A server that sees another /dev/shm: neither side can map the other's memory."""
    with tempfile.TemporaryDirectory(prefix="lmcache-other-host-") as other_shm:
        s = start_server("--lock-ttl-s", "30", env={"LMCACHE_SHM_DIR": other_shm})
        yield s
        s.stop()


def make_worker(server: ServerProcess, mode: TransferMode, kv: ShmKVCache) -> WorkerSide:
    # No heartbeat during a test: re-registration happens only when a test asks for it.
    config = ConnectorConfig(host="tcp://localhost", port=server.port, heartbeat_interval=3600)
    worker = WorkerSide(
        ServerLink(config), IDENTITY, ParallelStrategy(), mode, can_load=True, can_store=True
    )
    segments = [kv.segment] if mode == "engine_driven" else []
    worker.register_memory(kv.layout, [kv.segment.array], segments)
    return worker


@dataclass
class Rig:
    worker: WorkerSide
    kv: ShmKVCache

    @property
    def path(self) -> TransferPath:
        assert self.worker.path is not None
        return self.worker.path

    def blocks(self, ids: list[int]) -> np.ndarray:
        return self.kv.blocks[:, :, ids].copy()


PATHS: dict[str, tuple[TransferMode, bool, type[TransferPath]]] = {
    "shared": ("engine_driven", False, SharedKVPath),
    "pool": ("lmcache_driven", False, PoolPath),
    "bytes": ("lmcache_driven", True, BytesPath),
}


@pytest.fixture(params=list(PATHS))
def rig(
    request: pytest.FixtureRequest,
    server: ServerProcess,
    far_server: ServerProcess,
    engine: ShmKVCache,
) -> Iterator[Rig]:
    mode, far, _ = PATHS[request.param]
    worker = make_worker(far_server if far else server, mode, engine)
    fill_random(engine, 7)
    yield Rig(worker, engine)
    worker.shutdown()


def two_chunks() -> tuple[list[int], list[int], list[int]]:
    """Tokens of two chunks, the blocks they are stored from and other blocks to load into
    (shuffled, so that block order matters)."""
    ids = np.random.default_rng(3).permutation(64).tolist()
    return unique_tokens(2 * CHUNK).tolist(), ids[: 2 * BPC], ids[2 * BPC : 4 * BPC]


def store_spec(tokens: list[int], ids: list[int]) -> StoreSpec:
    return StoreSpec(request_id="s", tokens=tokens, start=0, end=len(tokens), block_ids=ids)


def load_spec(tokens: list[int], ids: list[int], skip_blocks: int = 0) -> LoadSpec:
    return LoadSpec(
        request_id="l", tokens=tokens, start=0, end=len(tokens), block_ids=ids,
        skip_tokens=skip_blocks * BLOCK,
    )  # fmt: skip


class TestTransferPathContract:
    """What every transfer path promises, run against all three."""

    def test_registration_picks_the_path(self, rig: Rig, request: pytest.FixtureRequest) -> None:
        _, uses_bytes, cls = PATHS[request.node.callspec.params["rig"]]
        assert type(rig.path) is cls
        assert rig.worker.uses_bytes is uses_bytes is rig.path.uses_bytes

    def test_store_then_load_into_other_blocks(self, rig: Rig) -> None:
        tokens, src, dst = two_chunks()
        original = rig.blocks(src)
        rig.path.store(store_spec(tokens, src))
        rig.path.store(store_spec(tokens, src))  # already cached: harmless
        rig.kv.blocks[:, :, dst] = 0
        rig.path.load(load_spec(tokens, dst))
        np.testing.assert_array_equal(rig.blocks(dst), original)
        np.testing.assert_array_equal(rig.blocks(src), original)  # the source is untouched

    def test_a_store_says_what_the_server_holds_and_its_keys(self, rig: Rig) -> None:
        tokens, src, _ = two_chunks()
        held = rig.path.store(store_spec(tokens, src), want_keys=True)
        assert held.tokens == 2 * CHUNK and len(held.keys) == 2
        assert all(len(k) == 48 for k in held.keys) and held.keys[0] != held.keys[1]
        again = rig.path.store(store_spec(tokens, src), want_keys=True)  # cached: same keys
        assert again == held
        assert rig.path.store(store_spec(tokens, src)).keys == ()  # not asked: none

    @pytest.mark.parametrize("skip", [3, BPC + 5], ids=["in-first-chunk", "past-first-chunk"])
    def test_skip_tokens_leave_skipped_blocks_untouched(self, rig: Rig, skip: int) -> None:
        tokens, src, dst = two_chunks()
        original = rig.blocks(src)
        rig.path.store(store_spec(tokens, src))
        rig.kv.blocks[:, :, dst] = SENTINEL
        rig.path.load(load_spec(tokens, dst, skip_blocks=skip))
        assert (rig.blocks(dst[:skip]) == SENTINEL).all()
        np.testing.assert_array_equal(rig.blocks(dst[skip:]), original[:, :, skip:])

    @pytest.mark.parametrize("skip", [0, 2, BPC + 1], ids=["all", "in-chunk", "in-partial"])
    def test_a_partial_tail_round_trips(self, rig: Rig, skip: int) -> None:
        """A chunk and 3 of the next chunk's blocks (a partial chunk: its own, smaller
        object), stored and loaded into other blocks through the same path."""
        ids = np.random.default_rng(5).permutation(64).tolist()
        n = BPC + 3
        src, dst = ids[:n], ids[n : 2 * n]
        tokens = unique_tokens(2 * CHUNK).tolist()
        end = CHUNK + 3 * BLOCK
        original = rig.blocks(src)
        spec = StoreSpec(request_id="s", tokens=tokens, start=0, end=end, block_ids=src)
        rig.path.store(spec)
        rig.path.store(spec)  # already cached: harmless
        rig.kv.blocks[:, :, dst] = SENTINEL
        load = LoadSpec(
            request_id="l", tokens=tokens, start=0, end=end, block_ids=dst,
            skip_tokens=skip * BLOCK,
        )  # fmt: skip
        rig.path.load(load)
        assert (rig.blocks(dst[:skip]) == SENTINEL).all()
        np.testing.assert_array_equal(rig.blocks(dst[skip:]), original[:, :, skip:])
        # The partial chunk alone; a longer partial was never stored: a miss.
        rig.kv.blocks[:, :, dst] = SENTINEL
        rig.path.load(LoadSpec("l", tokens, CHUNK, end, dst[BPC:]))
        np.testing.assert_array_equal(rig.blocks(dst[BPC:]), original[:, :, BPC:])
        with pytest.raises(CacheMissError):
            rig.path.load(LoadSpec("l", tokens, 0, end + BLOCK, ids[: n + 1]))

    def test_a_miss_becomes_load_errors_for_the_loaded_blocks(self, rig: Rig) -> None:
        tokens, _, dst = two_chunks()  # never stored
        rig.kv.blocks[:, :, dst] = SENTINEL
        with pytest.raises(CacheMissError):
            rig.path.load(load_spec(tokens, dst))
        rig.worker.start_load(Metadata(loads=[load_spec(tokens, dst, skip_blocks=2)]))
        assert rig.worker.load_errors() == set(dst[2:])
        assert rig.worker.load_errors() == set()  # reported once
        assert (rig.blocks(dst) == SENTINEL).all()

    def test_a_server_error_becomes_load_errors_until_registered_again(self, rig: Rig) -> None:
        tokens, src, dst = two_chunks()
        rig.worker.save(Metadata(stores=[store_spec(tokens, src)]))
        assert rig.worker.wait_for_stores(30)
        kind, link = type(rig.path), rig.worker.link
        link.client.unregister(rig.worker.instance_id)  # as after a server restart
        with pytest.raises(UnknownEngineError):
            rig.path.load(load_spec(tokens, dst))
        rig.worker.start_load(Metadata(loads=[load_spec(tokens, dst, skip_blocks=1)]))
        assert rig.worker.load_errors() == set(dst[1:])
        assert link.on_recover is not None
        link.on_recover(link.client.ping(rig.worker.instance_id))  # what the heartbeat does
        assert type(rig.path) is kind
        rig.worker.start_load(Metadata(loads=[load_spec(tokens, dst)]))
        assert rig.worker.load_errors() == set()
        np.testing.assert_array_equal(rig.blocks(dst), rig.blocks(src))

    def test_nothing_moves_while_the_link_is_down(self, rig: Rig) -> None:
        tokens, src, dst = two_chunks()
        rig.worker.link.mark_down("test")
        rig.worker.save(Metadata(stores=[store_spec(tokens, src)]))
        assert rig.worker.wait_for_stores(30)
        rig.kv.blocks[:, :, dst] = SENTINEL
        rig.worker.start_load(Metadata(loads=[load_spec(tokens, dst, skip_blocks=BPC)]))
        assert rig.worker.load_errors() == set(dst[BPC:])
        assert (rig.blocks(dst) == SENTINEL).all()
        with pytest.raises(CacheMissError):  # the save above stored nothing
            rig.path.load(load_spec(tokens, dst))


class TestStoresOffTheStep:
    """Stores run on the store thread after `save` returns (the default, async_store)."""

    def test_a_finished_request_is_reported_once_its_stores_are_done(self, rig: Rig) -> None:
        tokens, src, dst = two_chunks()
        original = rig.blocks(src)
        gate = threading.Event()
        path_store = rig.path.store

        def held_store(spec: StoreSpec, *, want_keys: bool = False) -> Held:
            gate.wait(30)
            return path_store(spec, want_keys=want_keys)

        rig.path.store = held_store  # type: ignore[method-assign]
        rig.worker.save(Metadata(stores=[store_spec(tokens, src)]))  # returns at once
        rig.worker.save(Metadata(finished_stores=["s", "never-stored"]))
        assert rig.worker.finished_stores() == {"never-stored"}  # "s" is still storing
        gate.set()
        assert rig.worker.wait_for_stores(30)
        assert rig.worker.finished_stores() == {"s"}
        assert rig.worker.finished_stores() == set()  # reported once
        rig.path.load(load_spec(tokens, dst))
        np.testing.assert_array_equal(rig.blocks(dst), original)

    def test_a_preemption_waits_for_running_stores(self, rig: Rig) -> None:
        tokens, src, _ = two_chunks()
        gate, finished = threading.Event(), threading.Event()
        path_store = rig.path.store

        def held_store(spec: StoreSpec, *, want_keys: bool = False) -> Held:
            gate.wait(30)
            held = path_store(spec, want_keys=want_keys)
            finished.set()
            return held

        rig.path.store = held_store  # type: ignore[method-assign]
        rig.worker.save(Metadata(stores=[store_spec(tokens, src)]))
        rig.worker.handle_preemptions(Metadata())  # nothing preempted: no wait
        assert not finished.is_set()
        threading.Timer(0.2, gate.set).start()
        rig.worker.handle_preemptions(Metadata(preempted=["other"]))
        assert finished.is_set()  # the store ended before the step could reuse blocks

    def test_a_failed_load_drops_that_requests_stores_of_the_step(self, rig: Rig) -> None:
        """Its later tokens were computed over blocks with no valid KV: never cached."""
        tokens, src, dst = two_chunks()
        miss = LoadSpec(request_id="s", tokens=unique_tokens(CHUNK).tolist(), start=0,
                        end=CHUNK, block_ids=dst[:BPC])  # fmt: skip
        rig.worker.start_load(Metadata(loads=[miss]))
        assert rig.worker.load_errors() == set(dst[:BPC])
        rig.worker.save(Metadata(stores=[store_spec(tokens, src)]))
        assert rig.worker.wait_for_stores(30)
        with pytest.raises(CacheMissError):
            rig.path.load(load_spec(tokens, dst))
        rig.worker.save(Metadata(stores=[store_spec(tokens, src)]))  # a later step: stored
        assert rig.worker.wait_for_stores(30)
        rig.path.load(load_spec(tokens, dst))


def test_the_paths_agree_byte_for_byte(server: ServerProcess, engine: ShmKVCache) -> None:
    """A chunk stored through any path loads through any other (one engine per memory kind)."""
    fill_random(engine, 11)
    client = server.client()
    memories: list[tuple[int, KVMemory]] = [(701, engine.memory), (702, WorkerCopy())]
    for iid, memory in memories:
        client.register(
            iid, model_name="agree", world_size=1, rank=0, dtype="bfloat16",
            layout=engine.layout, memory=memory,
        )  # fmt: skip
    copier = BlockCopier(engine.layout, [engine.segment.array], BPC)
    pong = client.ping()
    pool = PoolPath.attach(client, 702, copier, pong)
    paths: list[TransferPath] = [
        SharedKVPath(client, 701, copier, [engine.segment]),
        pool,
        BytesPath(client, 702, copier),
    ]
    for stored_by in paths:
        for loaded_by in paths:
            tokens, src, dst = two_chunks()
            stored_by.store(store_spec(tokens, src))
            engine.blocks[:, :, dst] = 0
            loaded_by.load(load_spec(tokens, dst))
            np.testing.assert_array_equal(engine.blocks[:, :, dst], engine.blocks[:, :, src])
    pool.close()
    copier.release()


class _Messages(logging.Handler):
    """The connector's log lines (its logger may not propagate: see `ensure_logging`)."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.mark.parametrize("mode", ["engine_driven", "lmcache_driven"])
def test_no_shared_memory_falls_back_to_bytes_and_logs_once(
    far_server: ServerProcess, engine: ShmKVCache, mode: TransferMode
) -> None:
    logger, messages = logging.getLogger("lmcache.integration"), _Messages()
    logger.addHandler(messages)
    try:
        worker = make_worker(far_server, mode, engine)
        assert isinstance(worker.path, BytesPath) and worker.uses_bytes
        assert worker.link.on_recover is not None
        worker.link.on_recover(worker.link.client.ping(worker.instance_id))  # re-registration
        assert isinstance(worker.path, BytesPath)
        worker.shutdown()
    finally:
        logger.removeHandler(messages)
    warnings = [m for m in messages.lines if "shares no memory with this worker" in m]
    assert len(warnings) == 1
    assert not [m for m in messages.lines if "inline" in m]


def test_shutdown_removes_the_segment_name_before_anything_can_stall_it(
    server: ServerProcess, engine: ShmKVCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vLLM SIGKILLs a worker whose shutdown outlasts its grace period (5 s, then SIGTERM
    and 4 s), e.g. stores waiting on a server that is gone: the KV segment's name goes
    first, so an interrupted shutdown leaves no KV cache behind in /dev/shm."""
    worker = make_worker(server, "engine_driven", engine)
    path = shm_path(engine.segment.name)
    assert os.path.exists(path)
    named_at_interrupt = []
    close_link = worker.link.close

    def interrupted() -> None:  # vLLM's SIGTERM handler raises SystemExit mid-shutdown
        named_at_interrupt.append(os.path.exists(path))
        raise SystemExit

    monkeypatch.setattr(worker.link, "close", interrupted)
    with pytest.raises(SystemExit):
        worker.shutdown()
    close_link()
    assert named_at_interrupt == [False]
    assert engine.blocks.size  # vLLM's own mapping stays valid


def test_re_registration_keeps_the_mapped_pool(server: ServerProcess, engine: ShmKVCache) -> None:
    worker = make_worker(server, "lmcache_driven", engine)
    first = worker.path
    assert isinstance(first, PoolPath)
    assert worker.link.on_recover is not None
    worker.link.on_recover(worker.link.client.ping(worker.instance_id))
    assert worker.path is first and first.pool.array.size  # same mapping, still open
    worker.shutdown()
