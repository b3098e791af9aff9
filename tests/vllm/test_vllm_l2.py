"""L2 tiers under a real vLLM: a restarted server and a second server find the KV in L2."""

from __future__ import annotations

import time
from pathlib import Path

from ..conftest import ServerProcess, start_redis, start_server
from .conftest import VllmProcess, kv_config, start_vllm
from .scenarios import prompt, same_output, wait_resumed


def wait_l2(server: ServerProcess, objects: int) -> None:
    deadline = time.monotonic() + 15
    while (
        sum(a["stored_objects"] for a in server.http().get("/status").json()["l2_adapters"])
        < objects
    ):
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_restarted_server_serves_from_the_fs_tier(
    tiny_model: Path, tmp_path: Path, vllm_factory: list[VllmProcess]
) -> None:
    adapter = f'{{"type": "fs", "path": "{tmp_path / "kv"}"}}'
    server = start_server("--l1-size-gb", "1", "--l2-adapter", adapter)
    port, http_port = server.port, server.http_port
    vllm = start_vllm(tiny_model, kv_config(port))
    vllm_factory.append(vllm)
    tokens = prompt(40, 1100)
    cold = vllm.complete(tokens)
    server.wait_log("Stored 1024 tokens")
    wait_l2(server, 4)
    since = len(vllm.log())
    server.stop()
    restarted = start_server(
        "--l1-size-gb",
        "1",
        "--l2-adapter",
        adapter,
        "--port",
        str(port),
        "--http-port",
        str(http_port),
    )
    try:
        wait_resumed(vllm, since, links=2)
        warm = vllm.complete(tokens)
        restarted.wait_log("Retrieved 1024 tokens")
        assert "Stored" not in restarted.log()
        same_output(cold, warm)
    finally:
        restarted.stop()


def test_second_server_shares_through_redis_and_survives_its_death(
    tiny_model: Path, vllm_factory: list[VllmProcess]
) -> None:
    redis = start_redis()
    adapter = f'{{"type": "redis", "url": "{redis.url}"}}'
    a = start_server("--l1-size-gb", "1", "--l2-adapter", adapter)
    b = start_server("--l1-size-gb", "1", "--l2-adapter", adapter)
    try:
        first = start_vllm(tiny_model, kv_config(a.port))
        vllm_factory.append(first)
        second = start_vllm(tiny_model, kv_config(b.port, mode="engine_driven"))
        vllm_factory.append(second)
        tokens = prompt(41, 1100)
        from_a = first.complete(tokens)
        a.wait_log("Stored 1024 tokens")
        wait_l2(a, 4)
        from_b = second.complete(tokens)
        b.wait_log("Retrieved 1024 tokens")
        same_output(from_a, from_b)

        redis.stop()  # every request still succeeds, from L1 or recomputed
        for seed in (42, 43):
            p = prompt(seed, 900)
            x, y = first.complete(p), second.complete(p)
            same_output(x, y)
        same_output(from_a, second.complete(tokens))
    finally:
        # vLLMs first: their default shutdown SIGKILLs the workers, and only a server still
        # running removes a dead worker's KV segment (stopped first, it left 1 GiB behind)
        for v in vllm_factory:
            v.stop()
        a.stop()
        b.stop()
        redis.stop()
