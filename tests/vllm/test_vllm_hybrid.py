"""A hybrid model through a real `vllm serve` (CPU build) with vLLM's hybrid KV cache
manager on (our connector implements `SupportsHMA`, so vLLM keeps it on).

A tiny random-weight Gemma2 model (`tiny_model.py --arch gemma2`, fp32) alternates
sliding-window (256 tokens) and full attention layers: two KV cache groups, each its own
block table. Each group registers as its own engine and stores and loads its own blocks;
the window group only those inside its window (`kv_groups.py`). One vLLM process.
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
    same_output,
)


@pytest.fixture(scope="module")
def stack(gemma2_model: Path) -> Iterator[tuple[ServerProcess, VllmProcess]]:
    server = start_server("--l1-size-gb", "1")
    vllm = start_vllm(gemma2_model, kv_config(server.port))
    yield server, vllm
    vllm.stop()
    server.stop()


def test_each_group_registers_as_its_own_engine(
    stack: tuple[ServerProcess, VllmProcess],
) -> None:
    server, vllm = stack
    assert "Turning off hybrid kv cache manager" not in vllm.log()
    engines = server.http().get("/status").json()["engines"]
    groups = sorted(e["kv_spec"].split(";group=")[1] for e in engines)
    assert groups == ["0/2;window=256", "1/2"]  # Gemma2's first layer slides
    assert sorted(e["num_layers"] for e in engines) == [1, 1]
    assert len({e["instance_id"] for e in engines}) == 2


def test_a_hit_gives_the_same_tokens_and_logprobs(
    stack: tuple[ServerProcess, VllmProcess],
) -> None:
    # the full group loads 5 blocks; the window group the chunk its window reaches into
    hit_matches_cold(*stack, prompt(70, 700), stored=[640, 640], retrieved=[384, 640])


def test_a_partial_hit_matches_a_cold_run(stack: tuple[ServerProcess, VllmProcess]) -> None:
    partial_hit_matches_cold(*stack, seed=71, stored=(512, 640), retrieved=[256, 512])


def test_a_group_whose_chunks_are_gone_makes_vllm_recompute(
    stack: tuple[ServerProcess, VllmProcess],
) -> None:
    """The primary group's lookup hits, the window group's chunks were deleted: its load
    fails, is reported as a failed receive (not as block ids, which would stop vLLM with
    several KV cache groups) and vLLM recomputes the request."""
    from lmcache.storage.keys import Namespace

    server, vllm = stack
    tokens = prompt(74, 700)
    cold = vllm.complete(tokens, ignore_eos=True)
    server.wait_log("Stored 640 tokens")
    (window,) = [
        e for e in server.http().get("/status").json()["engines"] if "window=" in e["kv_spec"]
    ]
    digest = Namespace(
        window["model_name"], window["world_size"], window["rank"], window["dtype"],
        window["kv_spec"],
    ).digest.hex()  # fmt: skip
    entries = server.http().get("/cache/objects", params={"page_size": 5000}).json()["entries"]
    doomed = [e["key"] for e in entries if e["key"].startswith(digest)]
    assert doomed
    r = server.http().request("DELETE", "/cache/objects", json={"keys": doomed, "force": True})
    assert r.json()["deleted"] == len(doomed)
    since = len(server.log())
    again = vllm.complete(tokens, ignore_eos=True)
    assert "Retrieved 640 tokens" in server.log()[since:]  # the full group's load went on
    assert vllm.proc.poll() is None
    same_output(cold, again)
    server.wait_log("Stored", since=since)  # recomputed, and the window group stored again


def test_a_restarted_server_caches_again(stack: tuple[ServerProcess, VllmProcess]) -> None:
    restarted_server_caches_again(*stack, prompt(73, 640), stored=640)
