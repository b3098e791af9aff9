"""End to end with a real vLLM (CPU build): what a KV server adds to vLLM's prefix cache.

    .venv/bin/python benchmarks/vllm_e2e.py [--quick] [--workloads ttft chat capacity
        two-instances restart decode] [--configs recompute vllm-prefix lmcache
        lmcache-noprefix lmcache-noprefix-sync lmcache-noprefix-layered upstream
        vllm-null-connector]
        [--skip-upstream] [--passes 2]
        [--prompts 10] [--lengths 512 1900 8000] [--json ...] [--plot ...]

Builds (once) the 8-layer random-weight model of the vLLM tests in .vllm-test/ and, for
the upstream configuration, the venv .bench/upstream-venv (scripts/setup-upstream, about
2 minutes). Then runs one configuration at a time (idle engines side by side on a small
machine distort each other), every one with the same vLLM flags apart from these:

    recompute         no connector, prefix caching off: every prompt is prefilled
    vllm-prefix       no connector, vLLM's own prefix cache: nothing is copied
    lmcache           this repository's server (`python -m lmcache.cli server`) through
                      the bare "LMCacheMPConnector" name, vLLM's prefix cache on
    lmcache-noprefix  the same with vLLM's prefix cache off (the CPU quick-start setting)
    lmcache-noprefix-sync  the same, loads copied before the forward pass instead of
                      layer by layer beside it (lmcache.mp.layerwise_load false; ttft only)
    lmcache-noprefix-layered  the same, every load layer by layer (layerwise_load true;
                      auto does so only from 4,096 tokens a step)
    upstream          LMCache 0.5.6 from PyPI (its own venv), the same connector name,
                      vLLM's prefix cache on
    vllm-null-connector  vLLM's prefix cache and a connector that does nothing
                      (benchmarks/e2e/null_connector.py): what vLLM's own handling of
                      any connector costs (ttft, chat, decode; only when named)

vLLM's KV pool is the same for all: --num-gpu-blocks-override sized so that the N prompts
of the longest TTFT phase stay resident (the JSON's log checks show the "KV cache size"
vLLM reports). Workloads, each run by the configurations it compares (--workloads):

* ttft (all): latency of a max_tokens=1 completion per prompt length: one warm-up,
  N distinct prompts (cold), then the same N again (warm).
* chat (all but the noprefix ones): U users x R rounds, interleaved round-robin, one
  request at a time; each round appends a user turn and streams a 32-token reply
  (TTFT = first streamed chunk); the history grows by fixed pseudo-random reply ids.
  Then G-1 more groups of U new users the same way (--chat-groups).
* capacity (vllm-prefix, lmcache, upstream): a working set --capacity-factor (2.5) times
  vLLM's pool, every prompt sent twice round-robin; round 2 has been evicted from vLLM.
* decode (vllm-prefix, lmcache, vllm-null-connector): tokens/s of 4 concurrent streams
  of 256 tokens after distinct ~1000-token cold prompts, with the connector storing
  them; and the cores each process used while all 4 streamed.
* two-instances (lmcache): a second vLLM started beside the first on the same server;
  A serves N prompts cold, then B gets the same ones.
* restart (vllm-prefix, lmcache): N prompts, vLLM restarted (the server stays), again.

All prompts are token-id lists from seeded generators, identical across configs.
By default two passes run the configurations forward, then backward, and pool the
timings, so a drift of the machine hits all of them alike (--quick: one pass). The vLLM
interpreter for every configuration but upstream is the one running this script (--venv
to change it). The end: the table of targets (ours / baseline, same run) and the JSON.
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
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from e2e import procs, report, scenarios, targets
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
    "chat_groups": (3, 1),
    # Two passes (forward, then backward): on a shared 2-core VM two passes of the same
    # config differed by up to 2x (cold, 1900 tokens); pooling both evens out the drift.
    "passes": (2, 1),
    "max_model_len": (9000, 4096),
    "capacity_length": (2048, 1024),
}
WORKLOADS = ("ttft", "chat", "capacity", "decode", "two-instances", "restart")
# The configurations each workload compares; a configuration runs only if some selected
# workload needs it.
APPLIES = {
    "ttft": procs.CONFIGS,
    "chat": ("recompute", "vllm-prefix", "lmcache", "upstream", "vllm-null-connector"),
    "capacity": ("vllm-prefix", "lmcache", "upstream"),
    "decode": ("vllm-prefix", "lmcache", "vllm-null-connector"),
    "two-instances": ("lmcache",),
    "restart": ("vllm-prefix", "lmcache"),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="3 prompts, 512 and 1900, 2 users x 3, 1 pass, no recompute",
    )
    p.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    p.add_argument("--prompts", type=int, help="distinct prompts per length (10)")
    p.add_argument("--lengths", type=int, nargs="+", help="prompt lengths (512 1900 8000)")
    p.add_argument(
        "--configs",
        nargs="+",
        choices=procs.CONFIGS,
        help="(all but lmcache-noprefix-layered and vllm-null-connector; --quick: no recompute)",
    )
    p.add_argument("--skip-upstream", action="store_true", help="leave out 'upstream'")
    p.add_argument("--users", type=int, help="chat users (4); 0 skips the chat workload")
    p.add_argument("--rounds", type=int, help="chat rounds per user (6)")
    p.add_argument(
        "--chat-groups", type=int, help="groups of U users, one after the other (3; --quick 1)"
    )
    p.add_argument("--chat-prefix", type=int, default=1000, help="context tokens per user")
    p.add_argument("--chat-turn", type=int, default=150, help="user-turn tokens per round")
    p.add_argument("--chat-output", type=int, default=32, help="reply tokens per round")
    p.add_argument("--passes", type=int, help="alternating passes, pooled (2; --quick 1)")
    p.add_argument("--blocks", type=int, help="vLLM KV blocks of 128 tokens (from the TTFT N)")
    p.add_argument("--capacity-factor", type=float, default=2.5, help="working set / pool")
    p.add_argument("--capacity-length", type=int, help="tokens per capacity prompt (2048)")
    p.add_argument("--restart-length", type=int, default=1900, help="restart/two-instances")
    p.add_argument("--streams", type=int, default=4, help="concurrent decode streams")
    p.add_argument("--decode-prompt", type=int, default=1000, help="decode prompt tokens")
    p.add_argument("--decode-output", type=int, default=256, help="tokens per decode stream")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-model-len", type=int, help="(9000; --quick 4096)")
    p.add_argument("--venv", type=Path, default=Path(sys.prefix), help="vLLM + our lmcache")
    p.add_argument("--upstream-venv", type=Path, default=ROOT / ".bench" / "upstream-venv")
    p.add_argument("--json", type=Path, default=RESULTS / "vllm_e2e.json")
    p.add_argument("--plot", type=Path, default=RESULTS / "vllm_e2e.png")
    args = p.parse_args()
    for name, (normal, quick) in SIZES.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else normal)
    if args.configs is None:
        # Only when asked for: forced-layered loads (auto covers the default), and vLLM with
        # a connector that does nothing (what any connector costs in vLLM itself).
        skip = {"lmcache-noprefix-layered", "vllm-null-connector"}
        skip |= {"recompute"} if args.quick else set()
        args.configs = [c for c in procs.CONFIGS if c not in skip]
    if args.skip_upstream and "upstream" in args.configs:
        args.configs.remove("upstream")
    if "chat" not in args.workloads:
        args.users = 0
    needed = {c for w in args.workloads for c in APPLIES[w]}
    args.configs = [c for c in args.configs if c in needed]
    chat_longest = args.chat_prefix + args.rounds * (args.chat_turn + args.chat_output)
    longest = max(*args.lengths, chat_longest, args.capacity_length, args.restart_length)
    if longest + args.chat_output > args.max_model_len:
        p.error(f"--max-model-len {args.max_model_len} is too small for {longest}-token prompts")
    if args.blocks is None:
        # Room for the warm-up and the N prompts of the longest TTFT phase, every chat
        # history, and one request of max_model_len; 10% spare, a multiple of 8 blocks.
        tokens = max(
            (args.prompts + 1) * max(args.lengths) if "ttft" in args.workloads else 0,
            args.users * (chat_longest + args.chat_output),
            args.max_model_len + procs.BLOCK_TOKENS,
        )
        args.blocks = -(-int(1.1 * tokens / procs.BLOCK_TOKENS) // 8) * 8
    pool = args.blocks * procs.BLOCK_TOKENS
    args.capacity_prompts = -(-int(args.capacity_factor * pool) // args.capacity_length)
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
    name: str,
    pass_no: int,
    *,
    venvs: procs.Venvs,
    model: Path,
    work: Workload,
    sc: scenarios.Scenarios,
    args: Any,
) -> dict[str, Any]:
    tag = f"p{pass_no}-{name}"
    logs = [args.log_dir / f"{tag}-server.log", args.log_dir / f"{tag}-vllm.log"]
    run: dict[str, Any] = {"config": name, "pass": pass_no, "error": None}
    print(f"[{name}] pass {pass_no + 1}/{args.passes}: starting", flush=True)
    start = time.monotonic()
    running = None
    client = None
    todo = [w for w in args.workloads if name in APPLIES[w]]
    try:
        running = procs.start_config(
            name, venvs, model, log_dir=args.log_dir, max_model_len=args.max_model_len,
            blocks=args.blocks, tag=tag,
        )  # fmt: skip
        logs = running.logs
        run["startup_s"] = running.startup_s
        run["server_startup_s"] = running.server_startup_s
        print(f"    vLLM up in {running.startup_s:.1f} s", flush=True)
        client = Client(running.port, model)
        client = run_workloads(
            run, todo, running=running, client=client, model=model, work=work, sc=sc, tag=tag
        )
        run["server_status"] = procs.server_status(running.server_http)
    except Exception as exc:  # one broken configuration must not lose the others
        run["error"] = repr(exc)
        print(f"    FAILED: {exc!r}", flush=True)
        for log in logs:
            if log.exists():
                tail = log.read_text(errors="replace").splitlines()[-8:]
                print(f"    tail of {log}:\n      " + "\n      ".join(tail), flush=True)
    finally:
        if client is not None:
            client.close()
        if running is not None:
            running.stack.close()
    run["seconds"] = time.monotonic() - start
    run["checks"] = checks = procs.log_checks(logs)
    run["logs"] = [str(p) for p in logs if p.exists()]
    print(f"    {run['seconds']:.0f} s; log checks: {checks}", flush=True)
    if name in procs.SERVER and not run["error"] and not checks["retrieves"]:
        print(f"    WARNING: no retrieve in the {name} logs: did the cache work?")
    return run


def run_workloads(
    run: dict[str, Any],
    todo: list[str],
    *,
    running: procs.Running,
    client: Client,
    model: Path,
    work: Workload,
    sc: scenarios.Scenarios,
    tag: str,
) -> Client:
    """The selected workloads, in an order that ends with the restart; the client of the
    (possibly restarted) vLLM comes back for the caller to close."""
    meter = CpuMeter(p.popen.pid for p in running.stack.procs)
    warm = scenarios.Warmups(sc.warmups)
    if "ttft" in todo:
        run["ttft"] = run_ttft(client, work, meter)
    if "chat" in todo and work.chat:
        run["chat"] = run_chat(client, work, meter)
    if "capacity" in todo:
        run["capacity"] = scenarios.run_capacity(client, sc, warm, meter, running.logs)
    if "decode" in todo:
        run["decode"] = scenarios.run_decode(client, sc, meter)
    if "two-instances" in todo:
        run["two"] = scenarios.run_two_instances(
            client, sc, warm, meter, lambda: start_b(running, model, meter, f"{tag}-b")
        )
    if "restart" in todo:

        def restart() -> Client:
            assert running is not None
            s = running.restart_vllm(f"{tag}-vllm-restarted")
            print(f"    vLLM restarted in {s:.1f} s", flush=True)
            meter.pgids = {p.popen.pid for p in running.stack.procs}
            return Client(running.port, model)

        run["restart"], client = scenarios.run_restart(client, sc, warm, meter, restart)
    return client


def start_b(
    running: procs.Running, model: Path, meter: CpuMeter, tag: str
) -> tuple[Client, Callable[[], None]]:
    """A second vLLM beside the first, on the same server: its client and its stop."""
    proc, port, seconds = running.spawn_vllm(tag)
    print(f"    instance B up in {seconds:.1f} s", flush=True)
    meter.pgids.add(proc.popen.pid)

    def stop() -> None:
        running.stack.procs.remove(proc)
        proc.stop()

    return Client(port, model), stop


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
    sc = scenarios.make_scenarios(
        seed=args.seed, vocab=vocab, capacity_prompts=args.capacity_prompts,
        capacity_length=args.capacity_length, restart_prompts=args.prompts,
        restart_length=args.restart_length, streams=args.streams,
        decode_prompt=args.decode_prompt, decode_output=args.decode_output,
    )  # fmt: skip
    work = make_workload(
        seed=args.seed, vocab=vocab, lengths=args.lengths, n=args.prompts, users=args.users,
        groups=args.chat_groups, rounds=args.rounds, prefix=args.chat_prefix, turn=args.chat_turn,
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
    print(f"Configs {args.configs}, workloads {args.workloads}; lengths {args.lengths},")
    print(
        f"{args.prompts} prompts each, chat {args.chat_groups} x {args.users} users x "
        f"{args.rounds} rounds;"
    )
    print(
        f"vLLM KV pool {args.blocks} blocks ({args.blocks * procs.BLOCK_TOKENS} tokens), "
        f"capacity {args.capacity_prompts} x {args.capacity_length} tokens; logs in "
        f"{args.log_dir}",
        flush=True,
    )
    runs: list[dict[str, Any]] = []
    # Results so far go to a file of their own, so that an interrupted run keeps them
    # without overwriting the last complete run's JSON.
    partial = args.json.with_name(args.json.stem + ".partial.json")
    try:
        for pass_no in range(args.passes):
            order = args.configs if pass_no % 2 == 0 else args.configs[::-1]
            for name in order:
                runs.append(
                    run_config(name, pass_no, venvs=venvs, model=model, work=work, sc=sc, args=args)
                )
                write_json(partial, meta, runs, args, began)
    finally:
        print(f"\nLogs of every server and vLLM: {args.log_dir}")
        if runs and len(runs) < args.passes * len(args.configs):
            print(f"Results of the configurations that ran: {partial}")
    result = write_json(args.json, meta, runs, args, began)
    partial.unlink(missing_ok=True)
    report.print_report(result["summary"], args.prompts, report.load_warnings(runs))
    targets.print_more(result["summary"])
    targets.print_targets(result["targets"])
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
    """Everything so far (the summary, the targets and every run) as JSON at ``path``."""
    summary = report.summarize(runs, args.configs)
    result = {
        "meta": {**meta, "seconds": time.monotonic() - began},
        "summary": summary,
        "targets": targets.targets(summary),
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
