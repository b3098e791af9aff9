"""The options of `lmcache bench`, apart from the bench itself.

`lmcache --help` and `lmcache server` build every subcommand's parser; this module
imports only argparse and the model shapes, so neither pays for the bench's imports
(tqdm, the harness, the phases): `lmcache.bench.runner` is imported only when the
bench runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .shapes import PRESETS, ModelShape, parse_shape

PHASES = ("transfers", "eviction", "lookups", "l2")
DEFAULT_TOKENS = 4096
"""Tokens per call: the size the targets are set for (`report.expected_at_size`)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model-shape",
        default="qwen3-14b",
        type=_shape,
        metavar="SHAPE",
        help=f"KV geometry: {', '.join(PRESETS)}, or LAYERS:KV_HEADS:HEAD_DIM[:BYTES] "
        "(default: qwen3-14b)",
    )
    p.add_argument(
        "--tokens",
        type=int,
        default=DEFAULT_TOKENS,
        help=f"tokens per store/retrieve/lookup, split over engines (default: {DEFAULT_TOKENS})",
    )
    p.add_argument("--reps", type=int, default=5, help="timed repetitions (default: 5)")
    p.add_argument(
        "--match",
        default="",
        metavar="TEXT",
        help="only the store/retrieve scenarios whose label contains TEXT, "
        "e.g. 'block 128' or 'lmcache_driven, 4 engines'",
    )
    p.add_argument(
        "--phases",
        nargs="+",
        choices=PHASES,
        default=list(PHASES),
        help="what to measure (default: all)",
    )
    p.add_argument(
        "--lookups",
        type=int,
        default=2000,
        help="timed lookup round trips for the latency percentiles (default: 2000)",
    )
    p.add_argument(
        "--concurrency",
        type=int,
        nargs="+",
        default=[1, 16],
        help="client threads for the lookups/s phase (default: 1 16)",
    )
    p.add_argument(
        "--concurrency-seconds",
        type=float,
        default=3.0,
        help="seconds per lookups/s measurement (default: 3)",
    )
    p.add_argument("--l1-size-gb", type=float, default=4.0, help="server L1 pool in GiB")
    p.add_argument("--l2-dir", type=Path, help="directory for the fs tier (default: $TMPDIR)")
    p.add_argument("--redis-url", help="use this Redis instead of starting a redis-server")
    p.add_argument("--no-redis", action="store_true", help="skip the Redis tier")
    p.add_argument("--no-fs", action="store_true", help="skip the fs tier")
    p.add_argument(
        "--quick",
        action="store_true",
        help="a fast pass: 1024 tokens, 2 reps, 300 lookups, 1 s per rate (a miss that "
        "the smaller size explains is marked as expected)",
    )
    p.add_argument("--json", type=Path, help="also write every result and raw timing here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")  # fmt: skip


def _shape(text: str) -> ModelShape:
    try:
        return parse_shape(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
