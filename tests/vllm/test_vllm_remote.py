"""A server whose shared memory the engine cannot reach (as on another host).

The server keeps its segments in another directory (``LMCACHE_SHM_DIR``), so neither
side can map the other's memory: the worker must notice by itself and send KV
bytes in the messages, with the same results.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from ..conftest import start_server
from .conftest import VllmProcess, kv_config, start_vllm
from .scenarios import prompt, same_output


@pytest.mark.parametrize("mode", [None, "engine_driven"], ids=["auto", "engine_driven"])
def test_no_shared_memory_falls_back_to_bytes_in_messages(
    tiny_model: Path, vllm_factory: list[VllmProcess], mode: str | None
) -> None:
    with tempfile.TemporaryDirectory(prefix="lmcache-other-host-") as other_shm:
        server = start_server("--l1-size-gb", "1", env={"LMCACHE_SHM_DIR": other_shm})
        try:
            vllm = start_vllm(tiny_model, kv_config(server.port, mode=mode))
            vllm_factory.append(vllm)
            assert vllm.log().count("shares no memory with this worker") == 1
            tokens = prompt(30, 1100)
            cold = vllm.complete(tokens)
            server.wait_log("Stored 1024 tokens")
            warm = vllm.complete(tokens)
            server.wait_log("Retrieved 1024 tokens")
            same_output(cold, warm)
        finally:
            server.stop()
