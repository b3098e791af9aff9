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
from .test_vllm_e2e import prompt, same_output

TP_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0|1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
TP_ARGS = ("--tensor-parallel-size", "2")


@pytest.fixture(scope="module")
def stack(tiny_model: Path) -> Iterator[tuple[ServerProcess, VllmProcess]]:
    server = start_server("--l1-size-gb", "1")
    vllm = start_vllm(tiny_model, kv_config(server.port), extra_args=TP_ARGS, env=TP_ENV)
    yield server, vllm
    vllm.stop()
    server.stop()


def count(server: ServerProcess, text: str, since: int = 0) -> int:
    return server.log()[since:].count(text)


def test_each_rank_registers_its_shard(stack: tuple[ServerProcess, VllmProcess]) -> None:
    server, _ = stack
    engines = server.http().get("/status").json()["engines"]
    assert sorted((e["rank"], e["world_size"]) for e in engines) == [(0, 2), (1, 2)]
    assert len({e["instance_id"] for e in engines}) == 2


def test_a_hit_gives_the_same_tokens_and_logprobs(
    stack: tuple[ServerProcess, VllmProcess],
) -> None:
    server, vllm = stack
    tokens = prompt(80, 700)
    since = len(server.log())
    cold = vllm.complete(tokens, ignore_eos=True)
    server.wait_log("Stored 640 tokens", since=since)
    warm = vllm.complete(tokens, ignore_eos=True)
    server.wait_log("Retrieved 640 tokens", since=since)
    assert count(server, "Stored 640 tokens", since) == 2  # each rank its own shard
    assert count(server, "Retrieved 640 tokens", since) == 2
    same_output(cold, warm)


def test_a_partial_hit_matches_a_cold_run(stack: tuple[ServerProcess, VllmProcess]) -> None:
    server, vllm = stack
    base = prompt(81, 600)
    other = base[:512] + prompt(82, 200)
    vllm.complete(base, ignore_eos=True)
    server.wait_log("Stored 512 tokens")
    since = len(server.log())
    partial = vllm.complete(other, ignore_eos=True)
    server.wait_log("Retrieved 512 tokens", since=since)
    assert server.http().post("/clear-cache").status_code == 200
    since = len(server.log())
    cold = vllm.complete(other, ignore_eos=True)
    server.wait_log("Stored 640 tokens", since=since)
    assert "Retrieved" not in server.log()[since:]
    same_output(partial, cold)


def test_a_restarted_server_caches_again(stack: tuple[ServerProcess, VllmProcess]) -> None:
    from .test_vllm_resilience import wait_for

    server, vllm = stack
    tokens = prompt(83, 640)
    cold = vllm.complete(tokens, ignore_eos=True)
    server.wait_log("Stored 640 tokens")
    server.stop()
    restarted = start_server(
        "--l1-size-gb", "1", "--port", str(server.port), "--http-port", str(server.http_port)
    )
    try:
        wait_for(vllm, "caching resumed")
        restarted.wait_log("Registered KV cache for GPU ID")
        again = vllm.complete(tokens, ignore_eos=True)
        restarted.wait_log("Stored 640 tokens")
        warm = vllm.complete(tokens, ignore_eos=True)
        restarted.wait_log("Retrieved 640 tokens")
        same_output(cold, again)
        same_output(cold, warm)
    finally:
        restarted.stop()
