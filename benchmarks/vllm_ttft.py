"""Time to first token with a real vLLM (CPU build): recompute, vLLM's prefix cache, LMCache.

    .venv/bin/python benchmarks/vllm_ttft.py [--prompts 6] [--tokens 1900] [--json out.json]

Builds (once) an 8-layer random-weight model in .vllm-test/, then runs one vLLM at a time
(several idle engines on a small machine distort each other) in three configurations:

    recompute      no connector, prefix caching off: every prompt is prefilled
    vllm-prefix    no connector, vLLM's own prefix cache: the limit, nothing is copied
    lmcache        our server via the bare "LMCacheMPConnector" name, prefix caching off

For each: a warm-up request, then N distinct prompts (cold) and the same N again (warm);
TTFT = latency of a max_tokens=1 completion. Reports medians and ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "1",
    "VLLM_HOST_IP": "127.0.0.1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def model_path() -> Path:
    path = ROOT / ".vllm-test" / "small-8layer"
    if not (path / "model.safetensors").exists():
        script = ROOT / "tests" / "vllm" / "tiny_model.py"
        args = ["--layers", "8", "--hidden", "512", "--heads", "8", "--kv-heads", "4"]
        subprocess.run([sys.executable, str(script), str(path), *args], check=True)
    return path


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not come up")


def run_config(name: str, model: Path, prompts: list[list[int]], log_dir: Path) -> dict[str, float]:
    server = None
    args = ["--enforce-eager", "--max-model-len", "4096"]
    if name == "vllm-prefix":
        args.append("--enable-prefix-caching")
    else:
        args.append("--no-enable-prefix-caching")
    if name == "lmcache":
        zmq_port, http_port = free_port(), free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "lmcache.cli", "server", "--l1-size-gb", "2",
             "--port", str(zmq_port), "--http-port", str(http_port), "--http-host", "127.0.0.1"],
            stdout=(log_dir / "server.log").open("wb"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        wait_http(f"http://127.0.0.1:{http_port}/healthcheck", server)
        kv = {"kv_connector": "LMCacheMPConnector", "kv_role": "kv_both",
              "kv_connector_extra_config": {"lmcache.mp.port": zmq_port}}  # fmt: skip
        args += ["--kv-transfer-config", json.dumps(kv)]
    port = free_port()
    vllm = subprocess.Popen(
        [str(Path(sys.executable).with_name("vllm")), "serve", str(model), "--host", "127.0.0.1",
         "--port", str(port), *args],
        stdout=(log_dir / f"vllm-{name}.log").open("wb"), stderr=subprocess.STDOUT,
        env={**os.environ, **ENV},
    )  # fmt: skip
    try:
        wait_http(f"http://127.0.0.1:{port}/health", vllm)
        url = f"http://127.0.0.1:{port}/v1/completions"

        def ttft(p: list[int]) -> float:
            body = {"model": str(model), "prompt": p, "max_tokens": 1, "temperature": 0}
            start = time.perf_counter()
            httpx.post(url, json=body, timeout=300).raise_for_status()
            return time.perf_counter() - start

        ttft(list(range(10, 300)))  # warm-up
        cold = [ttft(p) for p in prompts]
        warm = [ttft(p) for p in prompts]
        return {"cold_ms": statistics.median(cold) * 1e3, "warm_ms": statistics.median(warm) * 1e3}
    finally:
        for proc in (vllm, server):
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=1900)
    parser.add_argument("--json")
    args = parser.parse_args()
    model = model_path()
    rng = np.random.default_rng(7)
    prompts = [rng.integers(10, 2000, args.tokens).tolist() for _ in range(args.prompts)]
    log_dir = Path(tempfile.mkdtemp(prefix="lmcache-ttft-"))
    results = {
        name: run_config(name, model, prompts, log_dir)
        for name in ("recompute", "vllm-prefix", "lmcache")
    }
    print(f"TTFT, {args.tokens}-token prompts, medians of {args.prompts} (logs in {log_dir}):")
    for name, r in results.items():
        print(f"  {name:12s} cold {r['cold_ms']:7.1f} ms   warm {r['warm_ms']:7.1f} ms")
    ours, limit, base = results["lmcache"], results["vllm-prefix"], results["recompute"]
    print(f"  lmcache warm / vllm-prefix warm = {ours['warm_ms'] / limit['warm_ms']:.2f}")
    print(f"  lmcache cold / recompute cold   = {ours['cold_ms'] / base['cold_ms']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
