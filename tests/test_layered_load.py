"""Loads pipelined by layer (`layered_load.py`): the copy thread against a real server, and
the pipeline's order with a copier that the test holds back.

vLLM's forward pass is played by the test: `WorkerSide.wait_for_layer` for each layer in
order, then `save` (vLLM's `wait_for_save`) and `load_errors`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np
import pytest

from lmcache.engine.shm_kv import ShmKVCache
from lmcache.engine.transfer import BlockCopier
from lmcache.errors import TransferError
from lmcache.integration.vllm.config import ConnectorConfig
from lmcache.integration.vllm.layered_load import LayeredLoads
from lmcache.integration.vllm.link import ServerLink
from lmcache.integration.vllm.metadata import LoadSpec, Metadata, ParallelStrategy, StoreSpec
from lmcache.integration.vllm.transfer_paths import StagedLoad
from lmcache.integration.vllm.worker import WorkerSide

from .conftest import (
    BLOCK,
    CHUNK,
    LookupFields,
    ServerProcess,
    fill_random,
    lookup_hit,
    unique_tokens,
)
from .test_worker_paths import IDENTITY

BPC = CHUNK // BLOCK
LAYERS = [f"model.layers.{i}.self_attn.attn" for i in range(4)]  # the engine fixture's 4


def make_worker(
    server: ServerProcess, kv: ShmKVCache, *, layered: bool = True, min_tokens: int = 0
) -> WorkerSide:
    config = ConnectorConfig(host="tcp://localhost", port=server.port, heartbeat_interval=3600)
    worker = WorkerSide(
        ServerLink(config), IDENTITY, ParallelStrategy(), "lmcache_driven",
        can_load=True, can_store=True, layerwise_load=layered, layered_min_tokens=min_tokens,
    )  # fmt: skip
    worker.register_memory(kv.layout, [kv.segment.array], layer_names=LAYERS)
    return worker


def forward(worker: WorkerSide, meta: Metadata, skip: frozenset[int] = frozenset()) -> set[int]:
    """One engine step: load, wait for each layer (but ``skip``), save; the load errors."""
    worker.start_load(meta)
    for i, name in enumerate(LAYERS):
        if i not in skip:
            worker.wait_for_layer(name)
    worker.save(meta)
    return worker.load_errors()


@pytest.fixture
def worker(server: ServerProcess, engine: ShmKVCache) -> Iterator[WorkerSide]:
    w = make_worker(server, engine)
    fill_random(engine, 11)
    yield w
    w.shutdown()


def stored_range(worker: WorkerSide, kv: ShmKVCache, tail_blocks: int = 3) -> LoadSpec:
    """A chunk and a partial one stored from blocks 0.., returned as a load into other
    blocks that leaves the first 2 blocks alone (vLLM has them)."""
    n = BPC + tail_blocks
    tokens = unique_tokens(2 * CHUNK).tolist()
    end = n * BLOCK
    worker.save(Metadata(stores=[StoreSpec("s", tokens, 0, end, list(range(n)))]))
    assert worker.wait_for_stores(30)
    return LoadSpec("l", tokens, 0, end, list(range(n, 2 * n)), skip_tokens=2 * BLOCK)


def test_layers_copied_in_runs_equal_one_scatter(engine: ShmKVCache) -> None:
    fill_random(engine, 3)
    copier = BlockCopier(engine.layout, [engine.segment.array], BPC)
    ids = np.random.default_rng(1).permutation(64)[: BPC + 5]
    chunks = [np.random.default_rng(i).integers(0, 256, n, dtype=np.uint8) for i, n in
              enumerate(copier.piece_sizes(len(ids)))]  # fmt: skip
    copier.scatter_range(ids, chunks, skip_blocks=3)
    expected = engine.blocks.copy()
    fill_random(engine, 3)
    for i, src in enumerate(chunks):
        for layers in (range(0, 1), range(1, 3), range(3, 4)):
            copier.scatter_layers(src, ids, i, 3, layers)
    np.testing.assert_array_equal(engine.blocks, expected)
    with pytest.raises(ValueError, match="not a run"):
        copier.scatter_layers(chunks[0], ids, 0, 0, range(2, 5))


def test_loads_are_layered_once_a_forward_waited_for_every_layer(
    worker: WorkerSide, engine: ShmKVCache
) -> None:
    spec = stored_range(worker, engine)
    n = len(spec.block_ids)
    expected = engine.blocks[:, :, :n].copy()
    assert worker._layered is not None and not worker._layered.ready
    assert forward(worker, Metadata()) == set()  # a decode step: learns the waits
    assert worker._layered.ready
    engine.blocks[:, :, spec.block_ids] = 0
    worker.start_load(Metadata(loads=[spec]))
    for i, name in enumerate(LAYERS):
        worker.wait_for_layer(name)
        # Layer i is complete when its wait returns (later layers may still be copying).
        layer = engine.blocks[i]
        np.testing.assert_array_equal(layer[:, spec.block_ids[2:]], expected[i, :, 2:])
        assert (layer[:, spec.block_ids[:2]] == 0).all()  # vLLM's own blocks
    worker.save(Metadata(loads=[spec]))
    assert worker.load_errors() == set()
    np.testing.assert_array_equal(engine.blocks[:, :, spec.block_ids[2:]], expected[:, :, 2:])


@pytest.mark.parametrize("short", [True, False])
def test_a_step_that_loads_fewer_than_the_minimum_copies_before_the_forward(
    server: ServerProcess, engine: ShmKVCache, short: bool
) -> None:
    fill_random(engine, 13)
    probe = make_worker(server, engine)
    spec = stored_range(probe, engine)
    probe.shutdown()
    copied = spec.end - spec.start - spec.skip_tokens
    w = make_worker(server, engine, min_tokens=copied + 1 if short else copied)
    try:
        n = len(spec.block_ids)
        expected = engine.blocks[:, :, :n].copy()
        assert forward(w, Metadata()) == set()  # learns the waits: layered from now on
        engine.blocks[:, :, spec.block_ids] = 0
        w.start_load(Metadata(loads=[spec]))
        assert bool(w._layered_began) is not short  # short: copied already, no thread
        for name in LAYERS:
            w.wait_for_layer(name)
        w.save(Metadata(loads=[spec]))
        assert w.load_errors() == set()
        np.testing.assert_array_equal(engine.blocks[:, :, spec.block_ids[2:]], expected[:, :, 2:])
    finally:
        w.shutdown()


def test_a_forward_that_skips_a_layer_makes_its_loads_recompute(
    worker: WorkerSide, engine: ShmKVCache
) -> None:
    spec = stored_range(worker, engine)
    forward(worker, Metadata())
    errors = forward(worker, Metadata(loads=[spec]), skip=frozenset({2}))
    assert errors == set(spec.block_ids[2:])
    assert worker._layered is not None and not worker._layered.ready  # synchronous now
    expected = engine.blocks[:, :, : len(spec.block_ids)].copy()
    engine.blocks[:, :, spec.block_ids] = 0
    worker.start_load(Metadata(loads=[spec]))  # all copied before the forward pass
    np.testing.assert_array_equal(engine.blocks[:, :, spec.block_ids[2:]], expected[:, :, 2:])
    worker.save(Metadata(loads=[spec]))
    assert worker.load_errors() == set()


def test_a_copy_that_fails_reports_its_blocks_and_drops_its_stores(
    worker: WorkerSide, engine: ShmKVCache, server: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = stored_range(worker, engine)
    forward(worker, Metadata())
    copy_layers = StagedLoad.copy_layers

    def fails_at_layer_2(self: StagedLoad, layers: range) -> None:
        if layers.start == 2:
            raise TransferError("the KV memory shrank under the copy")
        copy_layers(self, layers)

    monkeypatch.setattr(StagedLoad, "copy_layers", fails_at_layer_2)
    tokens = unique_tokens(CHUNK).tolist()
    store = StoreSpec("l", tokens, 0, CHUNK, list(range(44, 44 + BPC)))  # the same request
    errors = forward(worker, Metadata(loads=[spec], stores=[store]))
    assert errors == set(spec.block_ids[2:])
    assert worker.wait_for_stores(30)
    model: LookupFields = {
        "model_name": IDENTITY.model_name, "world_size": 1, "dtype": IDENTITY.dtype,
        "kv_spec": IDENTITY.kv_spec, "block_size": BLOCK,
    }  # fmt: skip
    client = server.client()
    assert lookup_hit(client, "probe-1", tokens, **model) == 0  # dropped: computed over bad KV
    monkeypatch.undo()
    assert forward(worker, Metadata(loads=[spec], stores=[store])) == set()
    assert worker.wait_for_stores(30)
    assert lookup_hit(client, "probe-2", tokens, **model) == CHUNK  # the same store, kept


def test_the_forward_runs_while_later_layers_are_still_copying() -> None:
    """Layer 0's wait returns while the copy of layer 1 is held; the step ends only after
    every layer and the load's finish."""
    release = threading.Event()
    copied: list[int] = []
    finished: list[bool] = []

    class HeldCopier:
        def copy_layers(self, layers: range) -> None:
            if layers.start == 1:
                assert release.wait(10)
            copied.append(layers.start)

        def finish(self, ok: bool) -> None:
            finished.append(ok)

    layered: LayeredLoads[str] = LayeredLoads(["a", "b", "c"], lambda job, exc: None)
    for layer in "abc":
        layered.wait(layer)
    assert layered.end_step() == [] and layered.ready
    layered.begin([("job", HeldCopier())])  # type: ignore[list-item]
    layered.wait("a")
    assert copied == [0] and not finished
    release.set()
    layered.wait("b")
    layered.wait("c")
    assert layered.end_step() == []
    assert copied == [0, 1, 2] and finished == [True]
    layered.close()


class NoLoad(StagedLoad):
    """A staged load that copies nothing and finishes quietly (tests override a step)."""

    def __init__(self) -> None:
        pass

    def copy_layers(self, layers: range) -> None:
        pass

    def finish(self, ok: bool) -> None:
        pass


def test_a_failed_finish_fails_the_load() -> None:
    errors: list[tuple[str, Exception]] = []

    class FailingFinish(NoLoad):
        def finish(self, ok: bool) -> None:
            raise RuntimeError("commit refused")

    layered: LayeredLoads[str] = LayeredLoads(["a"], lambda j, e: errors.append((j, e)))
    layered.wait("a")
    layered.end_step()
    layered.begin([("job", FailingFinish())])
    layered.wait("a")
    assert layered.end_step() == ["job"]
    assert errors and errors[0][0] == "job" and "commit refused" in str(errors[0][1])
    layered.close()


def test_place_runs_on_the_copy_thread_before_its_first_copy() -> None:
    seen: list[tuple[str, str]] = []

    class Copier(NoLoad):
        def copy_layers(self, layers: range) -> None:
            seen.append(("copy", threading.current_thread().name))

    layered: LayeredLoads[str] = LayeredLoads(
        ["a"],
        lambda j, e: None,
        place=lambda: seen.append(("place", threading.current_thread().name)),
    )
    layered.wait("a")
    layered.end_step()
    for _ in range(2):
        layered.begin([("job", Copier())])
        layered.wait("a")
        assert layered.end_step() == []
    assert seen == [("place", "lmcache-layered-load")] + [("copy", "lmcache-layered-load")] * 2
    layered.close()


def test_layerwise_load_false_keeps_loads_synchronous(
    server: ServerProcess, engine: ShmKVCache
) -> None:
    w = make_worker(server, engine, layered=False)
    try:
        assert w._layered is None
        fill_random(engine, 5)
        spec = stored_range(w, engine)
        expected = engine.blocks[:, :, : len(spec.block_ids)].copy()
        engine.blocks[:, :, spec.block_ids] = 0
        w.start_load(Metadata(loads=[spec]))
        np.testing.assert_array_equal(engine.blocks[:, :, spec.block_ids[2:]], expected[:, :, 2:])
    finally:
        w.shutdown()
