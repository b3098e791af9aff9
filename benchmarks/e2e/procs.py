"""Start and stop the processes of one configuration: a KV server and `vllm serve`.

Every process gets its own session (process group), because `vllm serve` forks an
EngineCore and a Worker: stopping the group takes them down too, even when the API
server dies first, and a Ctrl-C in the terminal reaches only this script, which then
stops everything in order from its `finally`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from lmcache.processes import free_port

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = (
    "recompute", "vllm-prefix", "lmcache", "lmcache-noprefix", "lmcache-noprefix-sync",
    "lmcache-noprefix-layered", "upstream", "vllm-null-connector",
)  # fmt: skip
# vLLM with a connector that does nothing (`e2e.null_connector`): its own cost of one.
NULL_CONNECTOR = {
    "kv_connector": "NullConnector",
    "kv_connector_module_path": "e2e.null_connector",
    "kv_role": "kv_both",
}
# vLLM's own prefix cache is on for every configuration but these.
PREFIX_OFF = ("recompute", "lmcache-noprefix", "lmcache-noprefix-sync", "lmcache-noprefix-layered")
# Which KV server (and interpreter) a configuration uses; the others run no connector.
SERVER = {
    "lmcache": "ours", "lmcache-noprefix": "ours", "lmcache-noprefix-sync": "ours",
    "lmcache-noprefix-layered": "ours",
    "upstream": "upstream",
}  # fmt: skip
# Connector settings a configuration adds: -sync copies loads before the forward pass.
EXTRA = {
    "lmcache-noprefix-sync": {"lmcache.mp.layerwise_load": False},
    "lmcache-noprefix-layered": {"lmcache.mp.layerwise_load": True},
}
# At most 2 GiB of vLLM KV (8 KiB per token for the model below, i.e. 262k tokens); the
# benchmark sizes the pool of every configuration alike with --num-gpu-blocks-override
# (128-token blocks on CPU), so that all N long prompts of a TTFT phase stay resident in
# the vllm-prefix limit while the capacity workload's working set does not.
BLOCK_TOKENS = 128
ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "2",
    # Without it a configured connector changes vLLM's thread binding on 2 cores and
    # skews every comparison (see /work/shared/reference/vllm_on_cpu.md, section 7).
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "1",
    "VLLM_HOST_IP": "127.0.0.1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "LMCACHE_TRACK_USAGE": "false",
    "LMCACHE_DISABLE_BANNER": "1",
}
MODEL_ARGS = ("--layers", "8", "--hidden", "512", "--heads", "8", "--kv-heads", "4")
L1_SIZE_GB = "4"  # the capacity working set of a full run alone is about 2 GB


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, grace_s: float = 30) -> None:
        """SIGTERM to the whole group, SIGKILL after grace_s; also reaps orphans."""
        pgid = self.popen.pid
        if self.alive():
            _signal_group(pgid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                _signal_group(pgid, signal.SIGKILL)
                self.popen.wait()
        # Children may outlive their leader (an EngineCore whose API server crashed).
        deadline = time.monotonic() + 5
        while _group_exists(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _group_exists(pgid):
            _signal_group(pgid, signal.SIGKILL)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def _group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@dataclass
class Stack:
    """The processes of one configuration, stopped newest first."""

    log_dir: Path
    procs: list[Proc] = field(default_factory=list)

    def spawn(self, name: str, cmd: Sequence[str], env: Mapping[str, str] | None = None) -> Proc:
        log = self.log_dir / f"{name}.log"
        with log.open("wb") as out:
            out.write((" ".join(cmd) + "\n\n").encode())
            out.flush()
            popen = subprocess.Popen(
                list(cmd), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, **ENV, **(env or {})}, start_new_session=True, cwd=ROOT,
            )  # fmt: skip
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        while self.procs:
            self.procs.pop().stop()


def wait_http(url: str, proc: Proc, timeout_s: float = 600) -> float:
    """Seconds until url answers 200 (the process must stay alive meanwhile)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}: {proc.log}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"{url} did not come up in {timeout_s:.0f} s: {proc.log}")


@dataclass
class Venvs:
    ours: Path  # has vLLM and this repository's lmcache (editable)
    upstream: Path  # has vLLM and lmcache==0.5.6 from PyPI

    def of(self, config: str) -> Path:
        return self.upstream if config == "upstream" else self.ours


def model_path(venv: Path) -> Path:
    """The 8-layer random-weight model of the vLLM tests (about 1 s of prefill per 1900
    tokens here, so a cache hit is clearly visible), built once into .vllm-test/."""
    path = ROOT / ".vllm-test" / "small-8layer"
    if not (path / "model.safetensors").exists():
        script = ROOT / "tests" / "vllm" / "tiny_model.py"
        python = venv / "bin" / "python"
        subprocess.run([str(python), str(script), str(path), *MODEL_ARGS], check=True)
    return path


def ensure_upstream_venv(venv: Path, log_dir: Path) -> None:
    if (venv / "bin" / "lmcache").exists() and (venv / "bin" / "vllm").exists():
        return
    log = log_dir / "setup-upstream.log"
    print(f"Creating the upstream LMCache venv in {venv} (about 2 min, 2 GB; log {log}) ...")
    start = time.monotonic()
    with log.open("wb") as out:
        done = subprocess.run(
            [str(ROOT / "scripts" / "setup-upstream"), str(venv)],
            stdout=out,
            stderr=out,
            check=False,
        )
    if done.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise RuntimeError("scripts/setup-upstream failed:\n" + "\n".join(tail))
    print(f"  done in {time.monotonic() - start:.0f} s")


def versions(venv: Path) -> dict[str, str]:
    """Installed versions, read from metadata (importing vLLM would take seconds)."""
    code = (
        "import importlib.metadata as m, json\n"
        "out = {}\n"
        "for d in ('vllm-cpu', 'torch', 'lmcache', 'transformers', 'numpy'):\n"
        "    try: out[d] = m.version(d)\n"
        "    except m.PackageNotFoundError: pass\n"
        "print(json.dumps(out))"
    )
    python = venv / "bin" / "python"
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True)
    result: dict[str, str] = json.loads(done.stdout)
    return result


@dataclass
class Running:
    """A configuration that is up: where to send requests and how long it took."""

    port: int
    startup_s: float
    server_startup_s: float | None
    server_http: str | None
    stack: Stack
    vllm_args: list[str]  # without --port
    logs: list[Path]  # of every process started so far, stopped ones included
    vllm_env: dict[str, str] = field(default_factory=dict)  # on top of ENV

    def spawn_vllm(self, tag: str) -> tuple[Proc, int, float]:
        """One more vLLM with the same flags (and server) on a new port, once it is up."""
        port = free_port()
        vllm = self.stack.spawn(tag, [*self.vllm_args, "--port", str(port)], self.vllm_env)
        self.logs.append(vllm.log)
        return vllm, port, wait_http(f"http://127.0.0.1:{port}/health", vllm)

    def restart_vllm(self, tag: str) -> float:
        """Stop vLLM (the newest process), start it again on a new port, keep the server."""
        self.stack.procs.pop().stop()
        _, self.port, seconds = self.spawn_vllm(tag)
        return seconds


def start_config(
    name: str,
    venvs: Venvs,
    model: Path,
    *,
    log_dir: Path,
    max_model_len: int,
    blocks: int | None,
    tag: str,
) -> Running:
    """Start (server and) vLLM for one configuration; the caller closes running.stack."""
    stack = Stack(log_dir)
    try:
        return _start(name, venvs.of(name), model, max_model_len, blocks, stack=stack, tag=tag)
    except BaseException:
        stack.close()
        raise


def _start(
    name: str,
    venv: Path,
    model: Path,
    max_model_len: int,
    blocks: int | None,
    *,
    stack: Stack,
    tag: str,
) -> Running:
    bin_dir = venv / "bin"
    # Identical for every configuration apart from prefix caching and the connector.
    args = [
        str(bin_dir / "vllm"), "serve", str(model), "--host", "127.0.0.1",
        "--enforce-eager", "--dtype", "bfloat16", "--max-model-len", str(max_model_len),
        "--no-enable-prefix-caching" if name in PREFIX_OFF else "--enable-prefix-caching",
    ]  # fmt: skip
    if blocks is not None:
        args += ["--num-gpu-blocks-override", str(blocks)]
    server_s: float | None = None
    http: str | None = None
    logs: list[Path] = []
    if name in SERVER:
        zmq_port, http_port = free_port(), free_port()
        if SERVER[name] == "ours":
            server_cmd = [str(bin_dir / "python"), "-m", "lmcache.cli", "server"]
        else:
            server_cmd = [str(bin_dir / "lmcache"), "server", "--supported-transfer-mode", "auto"]
            # Without "auto" upstream waits for a GPU-driven registration that never
            # comes and vLLM's worker hangs in register_kv_caches.
        server_cmd += [
            "--l1-size-gb", L1_SIZE_GB, "--eviction-policy", "LRU", "--host", "127.0.0.1",
            "--port", str(zmq_port), "--http-host", "127.0.0.1", "--http-port", str(http_port),
        ]  # fmt: skip
        server = stack.spawn(f"{tag}-server", server_cmd)
        logs.append(server.log)
        http = f"http://127.0.0.1:{http_port}"
        server_s = wait_http(f"{http}/healthcheck", server)
        # The same bare connector name and extra config for both servers: vLLM's built-in
        # LMCacheMPConnector defers to the installed `lmcache` package's connector.
        kv = {
            "kv_connector": "LMCacheMPConnector",
            "kv_role": "kv_both",
            "kv_connector_extra_config": {
                "lmcache.mp.host": "tcp://127.0.0.1",
                "lmcache.mp.port": zmq_port,
                **EXTRA.get(name, {}),
            },
        }
        args += ["--kv-transfer-config", json.dumps(kv)]
    env: dict[str, str] = {}
    if name == "vllm-null-connector":
        args += ["--kv-transfer-config", json.dumps(NULL_CONNECTOR)]
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH")])
        )
    port = free_port()
    vllm = stack.spawn(f"{tag}-vllm", [*args, "--port", str(port)], env)
    logs.append(vllm.log)
    startup_s = wait_http(f"http://127.0.0.1:{port}/health", vllm)
    return Running(port, startup_s, server_s, http, stack, args, logs, env)


def server_status(http: str | None) -> object:
    if http is None:
        return None
    try:
        return httpx.get(f"{http}/status", timeout=10).json()
    except (httpx.HTTPError, ValueError) as exc:
        return {"error": repr(exc)}


_TRANSFER = re.compile(r"(Stored|Retrieved) (\d+) tokens")
_MODE = re.compile(r"Creating transfer context \(device_type=\w+, mode=(\w+)\)")
_SUPPRESSED = re.compile(r"suppressed (\d+) repeats of: (Stored|Retrieved) %d tokens")
_KV_TOKENS = re.compile(r"KV cache size: ([\d,]+) tokens")
_OVERRIDE = re.compile(r"Overriding num_gpu_blocks=(\d+) with num_gpu_blocks_override=(\d+)")

Marks = dict[Path, int]


def log_marks(logs: Sequence[Path]) -> Marks:
    """Where each log ends now: log_checks(logs, since=marks) reads only what follows."""
    return {p: p.stat().st_size for p in logs if p.exists()}


def log_checks(stack_logs: Sequence[Path], since: Marks | None = None) -> dict[str, object]:
    """What the logs say happened: transfer mode, stores and retrieves, fatal errors, and
    the KV pool vLLM allocated (its "KV cache size" line, and the block override)."""
    parts = []
    for p in stack_logs:
        if p.exists():
            with p.open("rb") as f:
                f.seek((since or {}).get(p, 0))
                parts.append(f.read().decode(errors="replace"))
    text = "\n".join(parts)
    counts = {"Stored": [0, 0], "Retrieved": [0, 0]}
    for kind, tokens in _TRANSFER.findall(text):
        counts[kind][0] += 1
        counts[kind][1] += int(tokens)
    # Our server lets 20 identical lines through per 10 s and then counts the rest; their
    # tokens are unknown, so *_tokens are a lower bound where "suppressed" is not 0.
    suppressed = 0
    for repeats, kind in _SUPPRESSED.findall(text):
        counts[kind][0] += int(repeats)
        suppressed += int(repeats)
    mode = _MODE.search(text)
    out: dict[str, object] = {
        # Upstream on CPU must say engine_driven; ours says lmcache_driven (shared memory).
        "transfer_mode": mode.group(1) if mode else None,
        "stores": counts["Stored"][0],
        "stored_tokens": counts["Stored"][1],
        "retrieves": counts["Retrieved"][0],
        "retrieved_tokens": counts["Retrieved"][1],
        "suppressed": suppressed,
        "fatal_error": "EngineCore encountered a fatal error" in text,
    }
    if since is None:
        kv = _KV_TOKENS.search(text)
        override = _OVERRIDE.search(text)
        out["kv_cache_tokens"] = int(kv.group(1).replace(",", "")) if kv else None
        out["blocks_override"] = [int(x) for x in override.groups()] if override else None
    return out


def check_interpreter(venv: Path) -> None:
    if not (venv / "bin" / "vllm").exists():
        sys.exit(f"{venv}/bin/vllm not found: run ./scripts/setup (or pass --venv)")
