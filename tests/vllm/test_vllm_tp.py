"""Tensor parallelism (TP=2) through a real `vllm serve` (CPU build): two worker ranks,
each registering and copying its own shard (MLA under TP=2: test_vllm_mla_tp.py).

vLLM's CPU build binds each rank's threads to a NUMA node and refuses TP=2 on a machine
with one ("Not enough allowed NUMA nodes to bind threads of 2 local CPUWorkers"), so the
ranks are bound by hand, one core each (``VLLM_CPU_OMP_THREADS_BIND=0|1``). One vLLM
process per model.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ..conftest import ServerProcess, start_server
from .conftest import VllmProcess, kv_config, start_vllm
from .scenarios import (
    hit_matches_cold,
    partial_hit_matches_cold,
    prompt,
    restarted_server_caches_again,
)

TP_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0|1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
# --shutdown-timeout: vLLM's default (0) SIGKILLs the workers at once, and its two CPU
# workers' own shared memory (vllm_dist_*-cpushm_*) then stays in /dev/shm; given time,
# they remove it (our segments are removed by the server either way).
TP_ARGS = ("--tensor-parallel-size", "2", "--shutdown-timeout", "10")


@pytest.fixture(scope="module")
def stack(tiny_model: Path) -> Iterator[tuple[ServerProcess, VllmProcess]]:
    server = start_server("--l1-size-gb", "1")
    vllm = start_vllm(tiny_model, kv_config(server.port), extra_args=TP_ARGS, env=TP_ENV)
    yield server, vllm
    vllm.stop()
    server.stop()


def test_each_rank_registers_its_shard(stack: tuple[ServerProcess, VllmProcess]) -> None:
    server, _ = stack
    engines = server.http().get("/status").json()["engines"]
    assert sorted((e["rank"], e["world_size"]) for e in engines) == [(0, 2), (1, 2)]
    assert len({e["instance_id"] for e in engines}) == 2


def test_a_hit_gives_the_same_tokens_and_logprobs(
    stack: tuple[ServerProcess, VllmProcess],
) -> None:
    # each rank stores and loads its own shard, and logs it
    hit_matches_cold(*stack, prompt(80, 700), stored=[640, 640], retrieved=[640, 640])


def test_a_partial_hit_matches_a_cold_run(stack: tuple[ServerProcess, VllmProcess]) -> None:
    partial_hit_matches_cold(*stack, seed=81, stored=(512, 640), retrieved=[512, 512])


def test_a_restarted_server_caches_again(stack: tuple[ServerProcess, VllmProcess]) -> None:
    restarted_server_caches_again(*stack, prompt(83, 640), stored=640, workers=2)
