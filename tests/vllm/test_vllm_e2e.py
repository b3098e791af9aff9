"""A real `vllm serve` with our connector, for both entry points and both CPU transfer modes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ..conftest import ServerProcess, start_server
from .conftest import VllmProcess, kv_config, start_vllm
from .scenarios import new_log, prompt, same_output

# (entry point, transfer mode); None = not set, i.e. "auto" (lmcache_driven on CPU). Each
# entry point and each CPU mode once: the entry point only decides which class vLLM loads
# (test_import_surface.py checks both resolve to ours), the mode the path KV bytes take, and
# a vLLM start costs ~45 s of CI. Every other tests/vllm module runs the bare built-in name.
CONFIGS = [
    ("builtin", None),
    ("module_path", "engine_driven"),
]


@pytest.fixture(scope="module", params=CONFIGS, ids=lambda c: f"{c[0]}-{c[1] or 'auto'}")
def stack(
    request: pytest.FixtureRequest, tiny_model: Path
) -> Iterator[tuple[ServerProcess, VllmProcess]]:
    entry, mode = request.param
    server = start_server("--l1-size-gb", "1")
    # Loads layer by layer beside the forward pass (auto picks "before it" on 2 cores; the
    # other vLLM tests run that default), so both load paths are proven on real vLLM.
    config = kv_config(
        server.port, module_path=entry == "module_path", mode=mode, layerwise_load=True
    )
    vllm = start_vllm(tiny_model, config)
    yield server, vllm
    vllm.stop()
    server.stop()


def test_connector_and_mode_are_ours(
    stack: tuple[ServerProcess, VllmProcess], request: pytest.FixtureRequest
) -> None:
    server, vllm = stack
    log = vllm.log()
    assert "LMCache INFO: Registering kv caches!" in log
    mode = "engine_driven" if "engine_driven" in request.node.callspec.id else "lmcache_driven"
    assert f"Creating transfer context (device_type=cpu, mode={mode})" in log
    if mode == "engine_driven":
        assert "lmcache.mp.mp_transfer_mode = engine_driven (overridden, default: auto)" in log
        assert "Migrated CPU KV cache tensor (nbytes=" in log and "to SHM /lmcache_kv_" in log
    if "builtin" in request.node.callspec.id:
        assert (
            "Using external LMCacheMPConnector from lmcache.integration.vllm.lmcache_mp_connector"
            in log
        )
    assert "Registered KV cache for GPU ID " in server.log() and "with 2 layers" in server.log()


def test_repeated_prompt_is_retrieved_with_identical_output(
    stack: tuple[ServerProcess, VllmProcess],
) -> None:
    server, vllm = stack
    tokens = prompt(1, 1100)  # 4 whole chunks of 256 tokens, plus a tail that is never cached
    mark = len(server.log())
    cold = vllm.complete(tokens)
    server.wait_log("Stored 1024 tokens in ", since=mark)  # stored behind the step
    mark = len(server.log())
    warm = vllm.complete(tokens)
    server.wait_log("Retrieved 1024 tokens in ", since=mark)
    assert "Stored" not in new_log(server, mark)
    same_output(cold, warm)
    # vLLM's CPU build waits for every layer, so the warm load ran beside the forward pass
    # (lmcache_driven; engine_driven loads are the server's copies, done before it).
    assert "waits for each of its 2 KV layers: loads this worker copies now run" in vllm.log()


def test_a_prompt_tail_of_whole_blocks_is_cached_too(
    stack: tuple[ServerProcess, VllmProcess],
) -> None:
    """Finer tails: 1200 tokens are 4 chunks, 1 whole block of 128 and 48 tokens; the
    block is stored as a partial chunk with the prompt, and loaded with its chunks."""
    server, vllm = stack
    tokens = prompt(4, 1200)
    mark = len(server.log())
    cold = vllm.complete(tokens)
    server.wait_log("Stored 1152 tokens in ", since=mark)
    mark = len(server.log())
    warm = vllm.complete(tokens)
    server.wait_log("Retrieved 1152 tokens in ", since=mark)
    assert "Stored" not in new_log(server, mark)
    same_output(cold, warm)


def test_shared_prefix_gets_a_partial_hit(stack: tuple[ServerProcess, VllmProcess]) -> None:
    server, vllm = stack
    base = prompt(2, 1100)
    mark = len(server.log())
    vllm.complete(base)
    server.wait_log("Stored 1024 tokens in ", since=mark)
    other = base[:600] + prompt(3, 500)  # shares 2 whole chunks (512 tokens)
    mark = len(server.log())
    reference_free = vllm.complete(other)
    assert "Retrieved 512 tokens in " in new_log(server, mark)
    server.wait_log("Stored 512 tokens in ", since=mark)  # its own chunks 2 and 3 are new
    again = vllm.complete(other)  # now a hit on 1024 tokens
    same_output(reference_free, again)
