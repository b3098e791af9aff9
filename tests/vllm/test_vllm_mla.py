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
from .test_vllm_e2e import prompt, same_output

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
    server, vllm = stack
    tokens = prompt(60, 700)
    since = len(server.log())
    cold = vllm.complete(tokens, ignore_eos=True)
    server.wait_log("Stored 688 tokens", since=since)  # 2 chunks and 11 blocks
    warm = vllm.complete(tokens, ignore_eos=True)
    server.wait_log("Retrieved 688 tokens", since=since)
    same_output(cold, warm)


def test_a_partial_hit_matches_a_cold_run(stack: tuple[ServerProcess, VllmProcess]) -> None:
    server, vllm = stack
    base = prompt(61, 600)
    other = base[:512] + prompt(62, 200)
    vllm.complete(base, ignore_eos=True)
    server.wait_log("Stored 592 tokens")
    since = len(server.log())
    partial = vllm.complete(other, ignore_eos=True)
    server.wait_log("Retrieved 512 tokens", since=since)
    assert server.http().post("/clear-cache").status_code == 200
    since = len(server.log())
    cold = vllm.complete(other, ignore_eos=True)
    server.wait_log("Stored 704 tokens", since=since)
    assert "Retrieved" not in server.log()[since:]
    same_output(partial, cold)


def test_a_restarted_server_caches_again(
    stack: tuple[ServerProcess, VllmProcess], mla_model: Path
) -> None:
    from .test_vllm_resilience import wait_for

    server, vllm = stack
    tokens = prompt(63, 640)
    cold = vllm.complete(tokens, ignore_eos=True)
    server.wait_log("Stored 640 tokens")
    server.stop()
    restarted = start_server(
        "--l1-size-gb", "1", "--port", str(server.port), "--http-port", str(server.http_port)
    )
    try:
        wait_for(vllm, "caching resumed")
        restarted.wait_log("Registered KV cache for GPU ID")
        again = vllm.complete(tokens, ignore_eos=True)  # the new server was empty
        restarted.wait_log("Stored 640 tokens")
        warm = vllm.complete(tokens, ignore_eos=True)
        restarted.wait_log("Retrieved 640 tokens")
        same_output(cold, again)
        same_output(cold, warm)
    finally:
        restarted.stop()
