"""A hybrid model's workers (`GroupedWorkers`) without vLLM: torch tensors laid out as
vLLM's CPU build lays out a hybrid model's KV under its hybrid manager (the layers of
two KV cache groups share one tensor; a block id belongs to one group at a time), against
a real `lmcache server`, in both shared-memory modes."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TypeVar

import numpy as np
import pytest
import torch

from lmcache.integration.vllm.config import ConnectorConfig, TransferMode
from lmcache.integration.vllm.identity import CacheIdentity
from lmcache.integration.vllm.kv_groups import KVGroup, group_identity
from lmcache.integration.vllm.link import ServerLink
from lmcache.integration.vllm.metadata import LoadSpec, Metadata, ParallelStrategy, StoreSpec
from lmcache.integration.vllm.worker import WorkerSide
from lmcache.integration.vllm.worker_groups import GroupedWorkers

from .conftest import BLOCK, CHUNK, ServerProcess, lookup_hit, unique_tokens

BPC = CHUNK // BLOCK
GROUPS = [KVGroup(0, ("layer.0",), 256), KVGroup(1, ("layer.1",), None)]


def worker(
    config: ConnectorConfig, ident: CacheIdentity, group: KVGroup, mode: TransferMode
) -> WorkerSide:
    """As the connector makes them: a window group stores inside the step."""
    return WorkerSide(
        ServerLink(config), group_identity(ident, group, len(GROUPS)), ParallelStrategy(),
        mode, can_load=True, can_store=True, async_store=group.sliding_window is None,
        layerwise_load=False,
        instance_id=os.getpid() * 4 + group.index,
    )  # fmt: skip


@pytest.fixture(params=["engine_driven", "lmcache_driven"])
def rig(
    request: pytest.FixtureRequest, server: ServerProcess
) -> Iterator[tuple[GroupedWorkers, torch.Tensor]]:
    mode: TransferMode = request.param
    config = ConnectorConfig(host="tcp://localhost", port=server.port, heartbeat_interval=3600)
    ident = CacheIdentity("hybrid", 1, "float32", f"torch-{request.node.name}", BLOCK)
    workers = [worker(config, ident, g, mode) for g in GROUPS]
    kv = torch.zeros((80, 2, BLOCK, 64), dtype=torch.float32)  # [blocks, heads, tokens, 2*head]
    grouped = GroupedWorkers(workers, GROUPS)
    grouped.register_kv_caches({"layer.0": kv, "layer.1": kv})  # one tensor, two groups
    kv.copy_(torch.rand(kv.shape, generator=torch.Generator().manual_seed(1)))
    yield grouped, kv
    grouped.shutdown()


Spec = TypeVar("Spec", LoadSpec, StoreSpec)


def specs(kind: type[Spec], tokens: list[int], ids: dict[int, list[int]]) -> list[Spec]:
    return [
        kind(request_id="r", tokens=tokens, start=0, end=len(tokens), block_ids=b, group=g)
        for g, b in ids.items()
    ]


def test_each_group_stores_and_loads_its_own_blocks(
    rig: tuple[GroupedWorkers, torch.Tensor], server: ServerProcess
) -> None:
    grouped, kv = rig
    engines = server.http().get("/status").json()["engines"]
    base = grouped.workers[0].identity.kv_spec.split(";")[0]  # this test's identity
    mine = [e for e in engines if e["kv_spec"].split(";")[0] == base]
    assert sorted(e["kv_spec"][len(base) :] for e in mine) == [
        ";group=0/2;window=256",
        ";group=1/2",
    ]
    assert len({e["instance_id"] for e in mine}) == 2
    tokens = unique_tokens(CHUNK).tolist()
    src = {0: list(range(1, 1 + BPC)), 1: list(range(17, 17 + BPC))}
    dst = {0: list(range(33, 33 + BPC)), 1: list(range(49, 49 + BPC))}
    original = {g: kv[ids].clone() for g, ids in src.items()}
    grouped.save(Metadata(stores=specs(StoreSpec, tokens, src)))
    grouped.save(Metadata(finished_stores=["r"]))
    for w in grouped.workers:
        assert w.wait_for_stores(30)
    assert grouped.finished_stores() == {"r"}  # once every storing group is done
    kv[33:] = 0
    grouped.start_load(Metadata(loads=specs(LoadSpec, tokens, dst)))
    assert grouped.finished_loads() == ({"r"}, set())  # vLLM's finished receive
    assert grouped.finished_loads() == (set(), set())
    grouped.save(Metadata())
    assert grouped.load_errors() == set()
    for g, ids in dst.items():
        assert torch.equal(kv[ids], original[g])


def test_a_failed_load_in_one_group_fails_the_request_and_every_group_store(
    rig: tuple[GroupedWorkers, torch.Tensor], server: ServerProcess
) -> None:
    grouped, _ = rig
    tokens = unique_tokens(CHUNK).tolist()
    never = unique_tokens(CHUNK).tolist()
    grouped.start_load(Metadata(loads=specs(LoadSpec, never, {1: list(range(1, 1 + BPC))})))
    grouped.save(Metadata(stores=specs(StoreSpec, tokens, {0: list(range(17, 17 + BPC))})))
    # a failed receive, never block ids: vLLM stops on those with several KV cache groups
    assert grouped.finished_loads() == ({"r"}, {"r"})
    assert grouped.load_errors() == set()
    for w in grouped.workers:
        assert w.wait_for_stores(30)
    ident = grouped.workers[0].identity
    client = server.client()
    hit = lookup_hit(
        client, "q", np.asarray(tokens, dtype=np.uint32), model_name=ident.model_name,
        world_size=1, dtype=ident.dtype, kv_spec=ident.kv_spec,
    )  # fmt: skip
    assert hit == 0
    client.end_session("q")
