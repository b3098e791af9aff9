"""`lmcache bench`: the order of phases, the progress bar and the outputs (options: `options`)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from lmcache.processes import ServerProcess

from .copy_phases import measure_eviction, measure_scenario
from .harness import CpuAccount
from .l2 import measure_l2
from .lookups import measure_lookups
from .options import DEFAULT_TOKENS
from .report import Row, document, format_table, summary
from .shapes import ModelShape
from .transfers import Mode, Scenario

Phase = Callable[[], tuple[list[Row], Any]]


def scenarios() -> list[tuple[int, Scenario]]:
    """(server chunk size, scenario): vLLM-style 16-token blocks and CPU 128-token blocks."""
    out = []
    modes: tuple[Mode, ...] = ("engine_driven", "lmcache_driven")
    for chunk, block in ((256, 16), (256, 128), (16, 16)):
        for mode in modes:
            for engines in (1, 4):
                out.append((chunk, Scenario(block, chunk, mode, engines)))
    return out


def run(args: argparse.Namespace) -> int:
    if args.quick:
        args.tokens, args.reps, args.lookups, args.concurrency_seconds = 1024, 2, 300, 1.0
    if args.tokens <= 0 or args.tokens % (256 * 4):
        raise SystemExit("lmcache bench: --tokens must be a positive multiple of 1024")
    shape: ModelShape = args.model_shape
    plan: list[tuple[str, Phase]] = []
    servers: dict[int, ServerProcess] = {}
    exit_codes: dict[int, int] = {}

    def server(chunk: int) -> ServerProcess:
        if chunk not in servers:
            servers[chunk] = ServerProcess.start(
                "--chunk-size", str(chunk), "--l1-size-gb", str(args.l1_size_gb),
                "--lock-ttl-s", "300",
            )  # fmt: skip
        return servers[chunk]

    def copies(chunk: int, sc: Scenario) -> Phase:
        return lambda: measure_scenario(server(chunk), shape, sc, args.tokens, args.reps)

    def eviction() -> tuple[list[Row], Any]:
        return measure_eviction(server(256), shape, args.tokens, args.reps)

    def lookups() -> tuple[list[Row], Any]:
        return measure_lookups(
            server=server(256), shape=shape, tokens=args.tokens, rounds=args.lookups,
            seconds=args.concurrency_seconds, concurrency=tuple(args.concurrency),
        )  # fmt: skip

    def stop_servers() -> None:
        for chunk in list(servers):
            exit_codes[chunk] = servers.pop(chunk).stop()

    def l2() -> tuple[list[Row], Any]:
        # The earlier phases' servers hold their L1 pools (4 GiB each by default), and a
        # growing Redis puts every byte on fresh memory: on the 2-vCPU VM of the results a
        # first write past ~10 GB in use ran at 0.3 instead of 1.3 GB/s, and the Redis store
        # row fell from 1.0-1.4 to 0.4 GB/s with them alive. Nothing later needs them.
        stop_servers()
        return measure_l2(
            shape=shape, tokens=args.tokens, reps=args.reps, l2_dir=args.l2_dir,
            redis_url=args.redis_url, with_redis=not args.no_redis, with_fs=not args.no_fs,
            l1_size_gb=args.l1_size_gb,
        )  # fmt: skip

    if "transfers" in args.phases:
        plan += [
            (sc.label(), copies(chunk, sc)) for chunk, sc in scenarios() if args.match in sc.label()
        ]
    if "eviction" in args.phases:
        plan.append(("eviction steady state", eviction))
    if "lookups" in args.phases:
        plan.append(("lookups", lookups))
    if "l2" in args.phases:
        plan.append(("L2 tiers", l2))

    mb = shape.token_bytes() * args.tokens / 1e6
    print(f"lmcache bench: {shape.describe()}; {args.tokens} tokens = {mb:.0f} MB per call; "
          f"median of {args.reps} reps")  # fmt: skip
    cpu = CpuAccount()
    rows: list[Row] = []
    raw: dict[str, Any] = {}
    bar = tqdm(plan, disable=args.no_progress, unit="phase", file=sys.stderr, leave=False)
    try:
        for label, phase in bar:
            bar.set_description(label)
            r, detail = phase()
            rows += r
            raw[label] = detail
    finally:
        bar.close()
        stop_servers()
    return _report(args, shape, rows, usage=cpu.done(), raw=raw, exit_codes=exit_codes)


def _report(
    args: argparse.Namespace, shape: ModelShape, rows: list[Row], *, usage: dict[str, float],
    raw: dict[str, Any], exit_codes: dict[int, int],
) -> int:  # fmt: skip
    print(format_table(rows, DEFAULT_TOKENS))
    print(f"\nother processes used {usage['others_share']:.0%} of the CPUs during the run "
          f"({usage['others_cpu_s']:.0f} CPU-s in {usage['wall_s']:.0f} s); steal "
          f"{usage['steal_s']:.1f} s")  # fmt: skip
    print(summary(rows, DEFAULT_TOKENS))
    bad = {c: code for c, code in exit_codes.items() if code != 0}
    if bad:
        print(f"server(s) did not exit cleanly on SIGTERM: {bad}", file=sys.stderr)
    if args.json:
        config = {k: (str(v) if isinstance(v, Path | ModelShape) else v)
                  for k, v in vars(args).items() if k != "func"}  # fmt: skip
        config["model_shape"] = vars(shape)
        doc = document(rows, config, {"cpu": usage, "raw": raw, "server_exit": exit_codes})
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2, default=str))
        print(f"wrote {args.json}")
    return 1 if bad else 0
