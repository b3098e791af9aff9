"""Fixtures for end-to-end tests with a real `vllm serve` (CPU build) and a tiny local model."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from lmcache.processes import free_port

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".vllm-test"

try:
    import vllm  # noqa: F401

    HAVE_VLLM = True
except ImportError:
    HAVE_VLLM = False

if not HAVE_VLLM and os.environ.get("LMCACHE_REQUIRE_VLLM") == "1":
    raise RuntimeError("LMCACHE_REQUIRE_VLLM=1 but vLLM is not installed (run ./scripts/setup)")

pytestmark = pytest.mark.skipif(not HAVE_VLLM, reason="vLLM is not installed")

VLLM_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "1",
    "VLLM_HOST_IP": "127.0.0.1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def build_model(name: str, *args: str) -> Path:
    """The tiny model ``name``, built once per checkout. Parallel test workers (xdist) may
    ask at the same time: one builds into a temporary folder under a lock and renames it,
    so nobody ever loads a half-written model."""
    path = CACHE / name
    if (path / "model.safetensors").exists():
        return path
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / f".{name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (path / "model.safetensors").exists():
            partial = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=CACHE))
            script = Path(__file__).with_name("tiny_model.py")
            subprocess.run([sys.executable, str(script), str(partial), *args], check=True)
            shutil.rmtree(path, ignore_errors=True)  # a folder an older run left half-built
            partial.rename(path)
    return path


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    return build_model("tiny-2layer")


@pytest.fixture(scope="session")
def mla_model() -> Path:
    """DeepseekV2 (MLA): one latent KV tensor per layer."""
    return build_model("tiny-deepseek-v2", "--arch", "deepseek_v2")


@pytest.fixture(scope="session")
def gemma2_model() -> Path:
    """Gemma2: sliding-window and full attention layers (two KV cache groups)."""
    return build_model("tiny-gemma2", "--arch", "gemma2")


@dataclass
class Completion:
    text: str
    tokens: list[str]
    logprobs: list[float]
    seconds: float


@dataclass
class VllmProcess:
    proc: subprocess.Popen[bytes]
    port: int
    model: Path
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def complete(
        self, prompt: list[int], max_tokens: int = 8, ignore_eos: bool = False
    ) -> Completion:
        """Greedy; ``ignore_eos``: all ``max_tokens`` even where a random model says EOS."""
        body = {
            "model": str(self.model),
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "logprobs": 1,
            "ignore_eos": ignore_eos,
        }
        start = time.perf_counter()
        r = httpx.post(f"http://127.0.0.1:{self.port}/v1/completions", json=body, timeout=120)
        seconds = time.perf_counter() - start
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        lp = choice["logprobs"]
        return Completion(choice["text"], lp["tokens"], lp["token_logprobs"], seconds)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


_STARTED: list[VllmProcess] = []  # every vLLM this worker started, for failure reports


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failed vLLM test shows what each vLLM still running said about LMCache (connector
    lines, warnings and errors): the server's log alone cannot tell a lookup that never
    came from one that timed out in the connector."""
    report = yield
    if not report.failed:
        return report
    for v in _STARTED:
        if v.proc.poll() is not None:
            continue
        lines = [
            line for line in v.log().splitlines()
            if re.search(r"lmcache|LMCache|ERROR|WARNING|Traceback", line)
        ]  # fmt: skip
        report.sections.append((f"vLLM on port {v.port} (LMCache lines)", "\n".join(lines[-60:])))
    return report


def start_vllm(
    model: Path,
    kv_config: dict[str, object],
    *,
    extra_args: tuple[str, ...] = (),
    wait: bool = True,
    env: dict[str, str] | None = None,
) -> VllmProcess:
    port = free_port()
    log = Path(tempfile.mkstemp(prefix="vllm-", suffix=".log")[1])
    cmd = [
        str(Path(sys.executable).with_name("vllm")), "serve", str(model),
        "--dtype", "float32", "--max-model-len", "4096", "--host", "127.0.0.1",
        "--port", str(port), "--enforce-eager", "--no-enable-prefix-caching",
        "--kv-transfer-config", json.dumps(kv_config), *extra_args,
    ]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **VLLM_ENV, **(env or {})}
        )
    v = VllmProcess(proc, port, model, log)
    _STARTED.append(v)
    if wait:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vllm exited with {proc.returncode}:\n{v.log()[-5000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                v.stop()
                raise RuntimeError(f"vllm did not start:\n{v.log()[-5000:]}")
            time.sleep(1)
    return v


def kv_config(
    port: int,
    *,
    module_path: bool = False,
    mode: str | None = None,
    role: str = "kv_both",
    **settings: object,
) -> dict[str, object]:
    """The --kv-transfer-config; ``settings``: more ``lmcache.mp.*`` keys (without it)."""
    extra: dict[str, object] = {"lmcache.mp.host": "tcp://localhost", "lmcache.mp.port": port}
    if mode is not None:
        extra["lmcache.mp.mp_transfer_mode"] = mode
    extra.update({f"lmcache.mp.{k}": v for k, v in settings.items()})
    config: dict[str, object] = {
        "kv_connector": "LMCacheMPConnector",
        "kv_role": role,
        "kv_connector_extra_config": extra,
    }
    if module_path:
        config["kv_connector_module_path"] = "lmcache.integration.vllm.lmcache_mp_connector"
    return config


@pytest.fixture
def vllm_factory() -> Iterator[list[VllmProcess]]:
    started: list[VllmProcess] = []
    yield started
    for v in started:
        v.stop()
