"""End to end with a real vLLM (CPU build): recompute, vLLM's prefix cache, ours, upstream.

    .venv/bin/python benchmarks/vllm_e2e.py [--quick] [--prompts 10] [--lengths 512 1900 8000]
        [--configs recompute vllm-prefix lmcache upstream] [--skip-upstream] [--passes 2]
        [--json benchmarks/results/vllm_e2e.json] [--plot benchmarks/results/vllm_e2e.png]

Builds (once) the 8-layer random-weight model of the vLLM tests in .vllm-test/ and, for
the upstream configuration, the venv .bench/upstream-venv (scripts/setup-upstream, about
2 minutes). Then runs one configuration at a time (idle engines side by side on a small
machine distort each other), every one with the same vLLM flags apart from these:

    recompute    no connector, prefix caching off: every prompt is prefilled
    vllm-prefix  no connector, vLLM's own prefix cache: the limit, nothing is copied
    lmcache      this repository's server (`python -m lmcache.cli server`) through the
                 bare "LMCacheMPConnector" name, prefix caching off
    upstream     LMCache 0.5.6 from PyPI (its own venv), the same connector name

Per configuration:
* TTFT = latency of a max_tokens=1 completion, per prompt length: one warm-up request,
  N distinct prompts (cold), then the same N again (warm).
* Multi-round chat: U users x R rounds, interleaved round-robin, one request at a time.
  Each user starts from a distinct context prefix; each round appends a user turn and
  streams a 32-token reply (TTFT = first streamed chunk), after which the history grows
  by fixed pseudo-random reply ids, so every configuration sees identical prompts.

All prompts are token-id lists from one seeded generator, identical across configs.
By default two passes run the configurations forward, then backward, and pool the
timings, so a drift of the machine hits all of them alike (--quick: one pass). The vLLM
interpreter for recompute, vllm-prefix and lmcache is the one running this script (--venv
to change it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NoReturn

from e2e import procs, report
from e2e.load import CpuMeter
from e2e.workload import Client, Workload, make_workload, run_chat, run_ttft

ROOT = procs.ROOT
RESULTS = ROOT / "benchmarks" / "results"
# (normal, --quick) defaults of the options that --quick shrinks.
SIZES: dict[str, tuple[Any, Any]] = {
    "prompts": (10, 3),
    "lengths": ([512, 1900, 8000], [512, 1900]),
    "users": (4, 2),
    "rounds": (6, 3),
    # Two passes (forward, then backward): on a shared 2-core VM two passes of the same
    # config differed by up to 2x (cold, 1900 tokens); pooling both evens out the drift.
    "passes": (2, 1),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument(
        "--quick", action="store_true", help="3 prompts, 512 and 1900, 2 users x 3, 1 pass"
    )
    p.add_argument("--prompts", type=int, help="distinct prompts per length (10)")
    p.add_argument("--lengths", type=int, nargs="+", help="prompt lengths (512 1900 8000)")
    p.add_argument("--configs", nargs="+", choices=procs.CONFIGS, default=list(procs.CONFIGS))
    p.add_argument("--skip-upstream", action="store_true", help="leave out 'upstream'")
    p.add_argument("--users", type=int, help="chat users (4); 0 skips the chat workload")
    p.add_argument("--rounds", type=int, help="chat rounds per user (6)")
    p.add_argument("--chat-prefix", type=int, default=1000, help="context tokens per user")
    p.add_argument("--chat-turn", type=int, default=150, help="user-turn tokens per round")
    p.add_argument("--chat-output", type=int, default=32, help="reply tokens per round")
    p.add_argument("--passes", type=int, help="alternating passes, pooled (2; --quick 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-model-len", type=int, default=9000)
    p.add_argument("--venv", type=Path, default=Path(sys.prefix), help="vLLM + our lmcache")
    p.add_argument("--upstream-venv", type=Path, default=ROOT / ".bench" / "upstream-venv")
    p.add_argument("--json", type=Path, default=RESULTS / "vllm_e2e.json")
    p.add_argument("--plot", type=Path, default=RESULTS / "vllm_e2e.png")
    args = p.parse_args()
    for name, (normal, quick) in SIZES.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else normal)
    if args.skip_upstream and "upstream" in args.configs:
        args.configs.remove("upstream")
    chat_longest = args.chat_prefix + args.rounds * (args.chat_turn + args.chat_output)
    longest = max(*args.lengths, chat_longest)
    if longest + args.chat_output > args.max_model_len:
        p.error(f"--max-model-len {args.max_model_len} is too small for {longest}-token prompts")
    return args


def machine_info() -> dict[str, Any]:
    cpu = ""
    mem_kb = 0
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal"):
            mem_kb = int(line.split()[1])
    git = subprocess.run(
        ["git", "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu,
        "mem_gib": round(mem_kb / 2**20, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "git": git.stdout.strip(),
    }


def run_config(
    name: str, pass_no: int, *, venvs: procs.Venvs, model: Path, work: Workload, args: Any
) -> dict[str, Any]:
    tag = f"p{pass_no}-{name}"
    logs = [args.log_dir / f"{tag}-server.log", args.log_dir / f"{tag}-vllm.log"]
    run: dict[str, Any] = {"config": name, "pass": pass_no, "error": None}
    print(f"[{name}] pass {pass_no + 1}/{args.passes}: starting", flush=True)
    start = time.monotonic()
    running = None
    try:
        running = procs.start_config(
            name, venvs, model, log_dir=args.log_dir, max_model_len=args.max_model_len, tag=tag
        )
        run["startup_s"] = running.startup_s
        run["server_startup_s"] = running.server_startup_s
        print(f"    vLLM up in {running.startup_s:.1f} s", flush=True)
        client = Client(running.port, model)
        meter = CpuMeter(p.popen.pid for p in running.stack.procs)
        try:
            run["ttft"] = run_ttft(client, work, meter)
            if work.chat:
                run["chat"] = run_chat(client, work, meter)
        finally:
            client.close()
        run["server_status"] = procs.server_status(running.server_http)
    except Exception as exc:  # one broken configuration must not lose the others
        run["error"] = repr(exc)
        print(f"    FAILED: {exc!r}", flush=True)
        for log in logs:
            if log.exists():
                tail = log.read_text(errors="replace").splitlines()[-8:]
                print(f"    tail of {log}:\n      " + "\n      ".join(tail), flush=True)
    finally:
        if running is not None:
            running.stack.close()
    run["seconds"] = time.monotonic() - start
    run["checks"] = checks = procs.log_checks(logs)
    run["logs"] = [str(p) for p in logs if p.exists()]
    print(f"    {run['seconds']:.0f} s; log checks: {checks}", flush=True)
    if name in ("lmcache", "upstream") and not run["error"] and not checks["retrieves"]:
        print(f"    WARNING: no retrieve in the {name} logs: did the cache work?")
    return run


def _terminate(signum: int, frame: object) -> NoReturn:
    # Turn SIGTERM into the same unwinding as Ctrl-C, so the `finally`s stop every process.
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> None:
    args = parse_args()
    signal.signal(signal.SIGTERM, _terminate)
    began = time.monotonic()
    args.log_dir = Path(tempfile.mkdtemp(prefix="lmcache-e2e-"))
    venvs = procs.Venvs(args.venv, args.upstream_venv)
    procs.check_interpreter(venvs.ours)
    if "upstream" in args.configs:
        procs.ensure_upstream_venv(venvs.upstream, args.log_dir)
    model = procs.model_path(venvs.ours)
    vocab = int(json.loads((model / "config.json").read_text())["vocab_size"])
    work = make_workload(
        seed=args.seed, vocab=vocab, lengths=args.lengths, n=args.prompts, users=args.users,
        rounds=args.rounds, prefix=args.chat_prefix, turn=args.chat_turn,
        output=args.chat_output,
    )  # fmt: skip
    used = {"ours": venvs.ours, "upstream": venvs.upstream}
    meta: dict[str, Any] = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": machine_info(),
        "versions": {
            k: procs.versions(v)
            for k, v in used.items()
            if k == "ours" or "upstream" in args.configs
        },
        "model": {"path": str(model), "args": list(procs.MODEL_ARGS), "dtype": "bfloat16"},
        "env": procs.ENV,
        "l1_size_gb": procs.L1_SIZE_GB,
    }
    print(f"Configs {args.configs}, lengths {args.lengths}, {args.prompts} prompts each, chat")
    print(f"{args.users} users x {args.rounds} rounds; logs in {args.log_dir}", flush=True)
    runs: list[dict[str, Any]] = []
    try:
        for pass_no in range(args.passes):
            order = args.configs if pass_no % 2 == 0 else args.configs[::-1]
            for name in order:
                runs.append(
                    run_config(name, pass_no, venvs=venvs, model=model, work=work, args=args)
                )
                write_json(args.json, meta, runs, args, began)
    finally:
        print(f"\nLogs of every server and vLLM: {args.log_dir}")
    result = write_json(args.json, meta, runs, args, began)
    report.print_report(
        result["summary"], result["ratios"], args.prompts, report.load_warnings(runs)
    )
    title = (
        f"vLLM 0.32 CPU, 8-layer random-weight model (bf16), {meta['machine']['cpu_count']} "
        f"CPUs, {args.prompts} prompts x {args.passes} pass(es)"
    )
    if report.plot(result["summary"], args.plot, title):
        print(f"Plot: {args.plot}")
    print(f"JSON: {args.json}; total {time.monotonic() - began:.0f} s")


def write_json(
    path: Path, meta: dict[str, Any], runs: list[dict[str, Any]], args: Any, began: float
) -> dict[str, Any]:
    """Everything so far, rewritten after every configuration (an interrupted run keeps it)."""
    summary = report.summarize(runs, args.configs)
    result = {
        "meta": {**meta, "seconds": time.monotonic() - began},
        "summary": summary,
        "ratios": report.ratios(summary),
        "runs": runs,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted: every process this run started has been stopped")
