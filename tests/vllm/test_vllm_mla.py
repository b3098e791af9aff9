"""MLA (DeepSeek-style latent attention) through a real `vllm serve` (CPU build).

A tiny random-weight DeepseekV2 model (`tiny_model.py --arch deepseek_v2`, fp32) on vLLM's
reference CPU MLA backend (``--attention-backend CPU_MLA``; the AMX one that vLLM prefers
on AMX machines takes bf16 weights only). Its KV cache is one latent tensor per layer
(``[blocks, 16, 576]``, vLLM forces 16-token blocks for MLA on CPU), registered as one
plane, and its identity marks the KV as shared by every rank (`SHARED_KV`). One vLLM
process for the module.
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

MLA_ARGS = ("--attention-backend", "CPU_MLA")


@pytest.fixture(scope="module")
def stack(mla_model: Path) -> Iterator[tuple[ServerProcess, VllmProcess]]:
    server = start_server("--l1-size-gb", "1")
    vllm = start_vllm(mla_model, kv_config(server.port), extra_args=MLA_ARGS)
    yield server, vllm
    vllm.stop()
    server.stop()


def test_registers_the_latent_as_kv_shared_by_every_rank(
    stack: tuple[ServerProcess, VllmProcess],
) -> None:
    server, _ = stack
    (engine,) = server.http().get("/status").json()["engines"]
    assert engine["kv_spec"].split(";")[-1] == "shared_kv"
    assert engine["block_size"] == 16 and engine["planes"] == 1
    assert engine["block_bytes"] == 16 * 576 * 4  # tokens x latent (512 + 64) x fp32


def test_a_hit_gives_the_same_tokens_and_logprobs(
    stack: tuple[ServerProcess, VllmProcess],
) -> None:
    hit_matches_cold(*stack, prompt(60, 700), stored=[688], retrieved=[688])  # 2 chunks, 11 blocks


def test_a_partial_hit_matches_a_cold_run(stack: tuple[ServerProcess, VllmProcess]) -> None:
    partial_hit_matches_cold(*stack, seed=61, stored=(592, 704), retrieved=[512])


def test_a_restarted_server_caches_again(stack: tuple[ServerProcess, VllmProcess]) -> None:
    restarted_server_caches_again(*stack, prompt(63, 640), stored=640)
