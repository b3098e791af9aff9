"""Degraded mode, server restarts, several engines, and the benefit in time to first token."""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from ..conftest import start_server
from .conftest import VllmProcess, build_model, kv_config, start_vllm
from .scenarios import prompt, same_output, wait_for, wait_resumed


def test_vllm_fails_clearly_when_no_server(tiny_model: Path) -> None:
    """The operator reads the reason once, not once per vLLM process that re-raises it."""
    from lmcache.defaults import L1_SIZE_GB
    from lmcache.processes import free_port

    port = free_port()
    v = start_vllm(tiny_model, kv_config(port), wait=False)
    try:
        assert v.proc.wait(timeout=240) != 0
    finally:
        v.stop()
    log = v.log()
    said = f"Cannot reach the LMCache server at tcp://localhost:{port} (connection refused)"
    assert log.count("Cannot reach the LMCache server") == 1, log[-5000:]
    assert said in log
    assert log.lower().count("is it running") <= 1
    line = log[log.index(said) :].splitlines()[0]
    assert "`lmcache server`" in line and "lmcache.mp.port" in line
    assert f"a {L1_SIZE_GB:g} GiB L1 by default" in line and "--l1-size-gb" in line
    assert "LMCacheStartError: the LMCache connector could not start" in log


def test_server_restart_under_a_running_engine(
    tiny_model: Path, vllm_factory: list[VllmProcess]
) -> None:
    server = start_server("--l1-size-gb", "1")
    port, http_port = server.port, server.http_port
    vllm = start_vllm(tiny_model, kv_config(port, mode="engine_driven"))
    vllm_factory.append(vllm)
    tokens = prompt(10, 800)
    cold = vllm.complete(tokens)
    server.wait_log("Stored 768 tokens")

    since = len(vllm.log())
    server.stop(signal.SIGKILL)  # no goodbye: the engine must notice on its own
    for seed in (11, 12, 13):
        vllm.complete(prompt(seed, 700))  # served without the cache
    same_output(cold, vllm.complete(tokens))
    wait_for(vllm, "entering degraded mode")

    restarted = start_server(
        "--l1-size-gb", "1", "--port", str(port), "--http-port", str(http_port)
    )
    try:
        wait_resumed(vllm, since, links=2)
        fresh = prompt(14, 800)
        first = vllm.complete(fresh)
        restarted.wait_log("Stored 768 tokens")
        second = vllm.complete(fresh)
        restarted.wait_log("Retrieved 768 tokens")
        same_output(first, second)
    finally:
        restarted.stop()


def test_two_engines_share_one_server(tiny_model: Path, vllm_factory: list[VllmProcess]) -> None:
    server = start_server("--l1-size-gb", "1")
    try:
        a = start_vllm(tiny_model, kv_config(server.port, mode="engine_driven"))
        vllm_factory.append(a)
        b = start_vllm(tiny_model, kv_config(server.port, module_path=True))
        vllm_factory.append(b)
        tokens = prompt(20, 1300)
        from_a = a.complete(tokens)
        server.wait_log("Stored 1280 tokens")
        mark = len(server.log())
        from_b = b.complete(tokens)
        assert "Retrieved 1280 tokens" in server.log()[mark:]
        same_output(from_a, from_b)
        registered = [
            line for line in server.log().splitlines() if "Registered KV cache for GPU ID" in line
        ]
        assert len(registered) == 2
    finally:
        for v in vllm_factory:  # vLLMs first: see test_vllm_l2 (a dead worker's segment)
            v.stop()
        server.stop()


def test_a_worker_killed_after_its_server_stopped_leaves_no_kv_segment(
    tiny_model: Path, vllm_factory: list[VllmProcess]
) -> None:
    """vLLM's default shutdown SIGKILLs its workers (in a race with their own clean-up,
    which starts when the engine core exits); with the server already gone, nobody but the
    connector's guard process can then remove a worker's KV segment."""
    # A directory of our own under /dev/shm: a server that another test starts meanwhile
    # would sweep our dead worker's segment at start-up, and pass this test for it.
    shm = Path(tempfile.mkdtemp(prefix="lmcache-test-", dir="/dev/shm"))
    env = {"LMCACHE_SHM_DIR": str(shm)}
    try:
        server = start_server("--l1-size-gb", "1", env=env)
        try:
            vllm = start_vllm(tiny_model, kv_config(server.port, mode="engine_driven"), env=env)
            vllm_factory.append(vllm)
            vllm.complete(prompt(30, 600))
            server.wait_log("Stored 512 tokens")
            (segment,) = [name for name in os.listdir(shm) if name.startswith("lmcache_kv_")]
        finally:
            server.stop()
        worker = int(segment.split("_")[2])  # lmcache_kv_<pid>_<idx>
        ours = psutil.Process(vllm.proc.pid).children(recursive=True)
        assert worker in [p.pid for p in ours]  # a process of the vLLM this test started
        os.kill(worker, signal.SIGKILL)  # what vLLM's shutdown does when it wins that race
        said = f"removed KV segment /{segment}: its engine exited without removing it"
        deadline = time.monotonic() + 10
        while said not in vllm.log():  # the guard unlinks, then says so
            assert time.monotonic() < deadline, f"{said!r} not logged; {os.listdir(shm)}"
            time.sleep(0.1)
        assert not [name for name in os.listdir(shm) if name.startswith("lmcache_kv_")]
    finally:
        for v in vllm_factory:
            v.stop()
        shutil.rmtree(shm, ignore_errors=True)


@pytest.fixture(scope="module")
def timing_model() -> Path:
    # 8 layers, hidden 512: prefill of ~1900 tokens takes about a second on 2 cores.
    return build_model(
        "small-8layer", "--layers", "8", "--hidden", "512", "--heads", "8", "--kv-heads", "4"
    )


def test_cache_hit_lowers_time_to_first_token(
    timing_model: Path, vllm_factory: list[VllmProcess]
) -> None:
    server = start_server("--l1-size-gb", "2")
    try:
        vllm = start_vllm(timing_model, kv_config(server.port, mode="engine_driven"))
        vllm_factory.append(vllm)
        vllm.complete(prompt(99, 300), max_tokens=2)  # warm-up (first logprobs request is slow)
        prompts = [
            np.random.default_rng(100 + i).integers(10, 2000, 1900).tolist() for i in range(4)
        ]
        cold = [vllm.complete(p, max_tokens=1) for p in prompts]
        warm = [vllm.complete(p, max_tokens=1) for p in prompts]
        for c, w in zip(cold, warm, strict=True):
            same_output(c, w)
        cold_s = statistics.median(c.seconds for c in cold)
        warm_s = statistics.median(w.seconds for w in warm)
        print(f"TTFT 1900 tokens: cold {cold_s * 1000:.0f} ms, warm {warm_s * 1000:.0f} ms")
        assert warm_s < 0.7 * cold_s
    finally:
        server.stop()
