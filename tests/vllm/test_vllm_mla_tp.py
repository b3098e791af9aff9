"""MLA under tensor parallelism (TP=2) through a real `vllm serve` (CPU build): the latent
KV, the same on both ranks, is stored once (by rank 0) and read by both. Its own module,
so that no other vLLM process holds the two cores the ranks are bound to.

vLLM's CPU MLA under TP=2 is not reproducible across processes: the same prompt and
weights gave three different greedy outputs in three `vllm serve` processes (within one
process, two cold runs are identical; TP=1 is reproducible). A hit kept the tokens and
moved logprobs by up to 0.01 in two runs and by more than 0.02 in a third (the tokens stayed
the same every time). So this test proves the path on real vLLM (both ranks registered with
shared keys, one store, both ranks retrieve, the request completes) but not output equality,
which vLLM does not give here even without a cache: the latent's bytes are checked without
vLLM (test_tensor_parallel.py), and identical outputs with a hit are proven for MLA at TP=1
(test_vllm_mla.py). A machine where vLLM's MLA under TP is reproducible (a GPU) should add
`same_output(cold, warm)` back.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ..conftest import start_server
from .conftest import kv_config, start_vllm
from .scenarios import counts, prompt, wait_counts
from .test_vllm_mla import MLA_ARGS
from .test_vllm_tp import TP_ARGS, TP_ENV


@pytest.mark.skipif(
    os.environ.get("LMCACHE_MLA_TP") != "1",
    reason="opt-in (LMCACHE_MLA_TP=1): vLLM's CPU MLA at TP=2 is not reproducible, and this "
    "test failed 2 of 3 CI runs on 2 cores; the path is covered by test_tensor_parallel.py",
)
def test_mla_latent_is_stored_once_and_read_by_both_ranks(mla_model: Path) -> None:
    server = start_server("--l1-size-gb", "1")
    vllm = start_vllm(
        mla_model, kv_config(server.port), extra_args=(*TP_ARGS, *MLA_ARGS), env=TP_ENV
    )
    try:
        engines = server.http().get("/status").json()["engines"]
        assert sorted(e["rank"] for e in engines) == [0, 1]
        assert all(e["kv_spec"].endswith(";shared_kv") for e in engines)
        tokens = prompt(84, 700)
        cold = vllm.complete(tokens, ignore_eos=True)
        server.wait_log("Stored 688 tokens")
        objects = server.http().get("/status").json()["l1"]["objects"]
        assert objects == 3  # 2 chunks and a partial one, once (rank 0's store)
        warm = vllm.complete(tokens, ignore_eos=True)
        wait_counts(server, "Retrieved", 0, [688, 688])  # both ranks read it
        assert counts(server, "Stored", 0) == [688]
        assert len(warm.tokens) == len(cold.tokens) > 0
    finally:
        vllm.stop()
        server.stop()
