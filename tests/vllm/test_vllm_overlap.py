"""Behind vLLM's own prefix cache, with stores off the step (issue 12).

One small vLLM (prefix caching on, room for about 5000 tokens of KV) in front of one server:
what vLLM evicts comes back from the server with the same output, a request that vLLM's
cache fully covers costs the server nothing, and stores that run while vLLM preempts and
reuses blocks never cache wrong bytes. The connector is ours with every store held back
(`slow_store_connector.py`), so that stores are still running when blocks are reused.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from ..conftest import ServerProcess, start_server
from .conftest import ROOT, VllmProcess, kv_config, start_vllm
from .scenarios import metric, new_log, prompt, same_output

BLOCKS = 40  # KV blocks vLLM gets: 40 x 128 = 5120 tokens


@pytest.fixture(scope="module")
def small(tiny_model: Path) -> Iterator[tuple[ServerProcess, VllmProcess]]:
    server = start_server("--l1-size-gb", "1")
    config = kv_config(server.port, mode="lmcache_driven")
    config["kv_connector"] = "SlowStoreConnector"
    config["kv_connector_module_path"] = "tests.vllm.slow_store_connector"
    vllm = start_vllm(
        tiny_model,
        config,
        extra_args=("--enable-prefix-caching", "--num-gpu-blocks-override", str(BLOCKS)),
        # For the connector module above; a PYTHONPATH already set (a worktree's src) stays.
        env={
            "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
        },
    )
    yield server, vllm
    vllm.stop()
    server.stop()


def server_metric(server: ServerProcess, name: str) -> float:
    return metric(server.http().get("/metrics").text, name)


def settled(server: ServerProcess, quiet_s: float = 1.5, timeout: float = 60) -> float:
    """Stored tokens, once no store has landed for ``quiet_s`` (stores are held back)."""
    deadline = time.monotonic() + timeout
    last, since = server_metric(server, "lmcache_stored_tokens_total"), time.monotonic()
    while time.monotonic() - since < quiet_s:
        assert time.monotonic() < deadline, "stores kept landing"
        time.sleep(0.1)
        now = server_metric(server, "lmcache_stored_tokens_total")
        if now != last:
            last, since = now, time.monotonic()
    return last


def flush_vllm(vllm: VllmProcess, seed: int) -> None:
    """Push everything out of vLLM's prefix cache: 6 other prompts of ~1100 tokens."""
    for i in range(6):
        vllm.complete(prompt(seed + i, 1100), max_tokens=1)


def test_what_vllm_evicted_comes_back_from_the_server(
    small: tuple[ServerProcess, VllmProcess],
) -> None:
    server, vllm = small
    tokens = prompt(11, 1100)
    mark = len(server.log())
    cold = vllm.complete(tokens)  # computed: stored behind the step
    server.wait_log("Stored 1024 tokens in ", since=mark)
    flush_vllm(vllm, 100)
    mark = len(server.log())
    warm = vllm.complete(tokens)
    assert "Retrieved 1024 tokens in " in new_log(server, mark)
    same_output(cold, warm)


def test_a_request_vllm_fully_covers_costs_the_server_nothing(
    small: tuple[ServerProcess, VllmProcess],
) -> None:
    server, vllm = small
    tokens = prompt(12, 1100)
    mark = len(server.log())
    first = vllm.complete(tokens)
    server.wait_log("Stored 1024 tokens in ", since=mark)
    stored = settled(server)
    asked = server_metric(server, "lmcache_lookup_requested_tokens_total")
    mark = len(server.log())
    again = vllm.complete(tokens)  # vLLM's own cache has every whole chunk
    assert server_metric(server, "lmcache_lookup_requested_tokens_total") == asked
    assert settled(server) == stored
    assert "Retrieved" not in new_log(server, mark)
    same_output(first, again)


def test_stores_under_preemption_cache_the_right_bytes(
    small: tuple[ServerProcess, VllmProcess],
) -> None:
    """Four long requests at once do not fit: vLLM preempts, frees and reuses blocks
    while their stores run. Whatever got cached must give the reference output."""
    server, vllm = small
    prompts = [prompt(20 + i, 1100) for i in range(4)]
    refs = [vllm.complete(p) for p in prompts]  # one at a time: the reference outputs
    flush_vllm(vllm, 200)
    assert server.http().post("/clear-cache").status_code == 200
    preempted = metric(vllm_metrics(vllm), "vllm:num_preemptions_total")
    mark = len(server.log())
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda p: vllm.complete(p, max_tokens=300), prompts))
    assert metric(vllm_metrics(vllm), "vllm:num_preemptions_total") > preempted
    settled(server)
    assert "Stored " in new_log(server, mark)
    flush_vllm(vllm, 300)
    mark = len(server.log())
    for p, ref in zip(prompts, refs, strict=True):
        same_output(ref, vllm.complete(p))
    assert new_log(server, mark).count("Retrieved 1024 tokens in ") >= 2


def vllm_metrics(vllm: VllmProcess) -> str:
    return httpx.get(f"http://127.0.0.1:{vllm.port}/metrics", timeout=10).text
