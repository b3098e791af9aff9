"""Upstream LMCache (0.5.x) `lmcache server` flags, translated onto ours before parsing.

An operator moving from upstream keeps their command line: a flag whose meaning we honour
is rewritten to our flag (``--worker-reap-timeout-seconds 90`` -> ``--engine-timeout-s
90``); a flag that states what we do anyway is dropped (``--transport zmq``); every other
upstream flag stops the server with ONE line naming it (exit 2, as argparse does), never
silently ignored, because a user who asked for P2P or a coordinator must know they do not
have it. The table here is the one place that says which is which; README's
"Upstream compatibility" mirrors it.

Done on argv (not as settings fields) so that our settings model, its ``LMCACHE_*``
variables and ``--help`` stay ours, and upstream's names never become a second way to
configure the same thing in the environment.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

PREFIX = "lmcache"


@dataclass(frozen=True)
class Alias:
    """Upstream flag -> our flag; ``values`` maps upstream values onto ours, and a value
    listed in ``refused`` is refused with its reason. No ``values``: passed as given."""

    ours: str
    values: dict[str, str] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Same:
    """A flag that only states what this server does anyway: dropped. ``takes_value``:
    it has a value, which must be one of ``accepted`` (others are refused)."""

    takes_value: bool
    accepted: frozenset[str] = frozenset()
    why: str = ""


_TTL = "--lock-ttl-s"  # our one lock/session TTL: see `_check_ttls`
ALIASES: dict[str, Alias] = {
    "--worker-reap-timeout-seconds": Alias("--engine-timeout-s"),
    "--session-ttl-seconds": Alias(_TTL),
    "--l1-read-ttl-seconds": Alias(_TTL),
    "--l1-write-ttl-seconds": Alias(_TTL),
    "--max-gpu-workers": Alias("--max-workers"),
    "--l2-prefetch-max-in-flight": Alias("--l2-prefetch-workers"),
    "--l2-store-policy": Alias(
        "--l2-store-policy",
        values={"default": "all", "all": "all", "first": "first"},
        refused={"skip_l1": "chunks always stay in L1 after an L2 write here"},
    ),
    "--l2-prefetch-policy": Alias(
        "--l2-prefetch-policy",
        values={"default": "order", "order": "order", "fastest": "fastest"},
        refused={"retain": "prefetched chunks are always kept in L1 here"},
    ),
    "--hash-algorithm": Alias(
        "--hash-algorithm",
        refused={
            "builtin": "Python's hash() is not stable across processes; use sha256 or blake3",
            "sha256_cbor": "use sha256 or blake3 (chunk keys are not upstream's anyway)",
        },
    ),
}

_BOTH_PATHS = "this server always serves both transfer paths; the connector picks one"
SAME: dict[str, Same] = {
    "--transport": Same(True, frozenset({"zmq"}), "only the ZMQ transport exists here"),
    "--engine-type": Same(True, frozenset({"default"}), "CacheBlend is not implemented"),
    "--supported-transfer-mode": Same(
        True, frozenset({"auto", "lmcache_driven", "engine_driven"}), _BOTH_PATHS
    ),
    "--isolated-ipc": Same(False, why="missing shared memory is detected at registration"),
    "--no-isolated-ipc": Same(False),
    # Our pool is lazy by itself when /dev/shm cannot hold it, and --l1-init-size-gb (a
    # flag of ours, same meaning as upstream's) makes any pool lazy; upstream's switch
    # adds nothing to that.
    "--l1-use-lazy": Same(False, why="a pool larger than /dev/shm's free space grows lazily"),
    "--no-l1-use-lazy": Same(False, why="a pool that fits in /dev/shm is allocated at start"),
    "--no-l1-use-hugepages": Same(False),
    "--no-run-script-api-enabled": Same(False),
    "--separate-object-groups": Same(
        False, why="each KV cache group of a hybrid model is cached as its own objects"
    ),
    "--no-gds-l1-use-direct-io": Same(False),
    "--l1-align-bytes": Same(True, frozenset({"4096"}), "L1 pages are 4096 bytes"),
    "--null-block-id": Same(True, frozenset({"0"}), "block 0 is never read or written"),
    "--disable-grpc-metrics": Same(False, why="there is no gRPC transport"),
}

# Flag -> what it belongs to (the one line says "<flag> (<feature>) is not supported").
REFUSED: dict[str, str] = {
    **dict.fromkeys(["--max-cpu-workers"], "a lookup thread pool; lookups run on the ZMQ loop"),
    "--grpc-server-workers": "gRPC transport",
    **dict.fromkeys(
        ["--enable-segmented-prefix", "--enable-dedup-content", "--enable-blend-reorder"],
        "CacheBlend",
    ),
    **dict.fromkeys(
        ["--runtime-plugin-locations", "--runtime-plugin-config", "--server-module"], "plugins"
    ),
    "--shm-name": "a named engine-driven SHM segment; the L1 pool names itself",
    **dict.fromkeys(
        ["--script-allowed-imports", "--run-script-api-enabled"], "the /run_script endpoint"
    ),
    "--no-separate-object-groups": (
        "one object for every KV cache group of a hybrid model; each group is its own here"
    ),
    "--worker-registration-grace-seconds": "a separate grace for never-pinging workers",
    "--enable": "experimental transfer modules",
    "--periodic-notifier-interval-ms": "the periodic event notifier",
    **dict.fromkeys(
        [
            "--p2p-advertise-url",
            "--p2p-listen-url",
            "--p2p-lookup-timeout",
            "--p2p-load-timeout",
            "--p2p-transfer-engine",
        ],
        "P2P KV transfer",
    ),
    "--l1-manager": "tagged L1 managers (DRAM/DEVDAX/GDS)",
    "--l1-use-hugepages": "hugepage L1",
    "--l1-devdax-path": "DAX L1",
    **dict.fromkeys(
        ["--gds-l1-path", "--gds-l1-use-direct-io", "--gds-l1-backend"], "GPUDirect Storage L1"
    ),
    "--disable-logging": "event-bus logging subscribers",
    **dict.fromkeys(["--enable-tracing", "--otlp-endpoint"], "OpenTelemetry"),
    "--event-bus-queue-size": "the observability event bus",
    "--metrics-sample-rate": "sampled lifecycle histograms",
    **dict.fromkeys(
        [
            "--lookup-hash-log-dir",
            "--lookup-hash-log-rotation-interval",
            "--lookup-hash-log-rotation-max-size",
            "--lookup-hash-log-max-files",
        ],
        "lookup hash logging",
    ),
    **dict.fromkeys(
        ["--enable-gc-monitor", "--gc-monitor-min-pause-ms", "--gc-monitor-top-objects"],
        "the GC monitor",
    ),
    **dict.fromkeys(["--enable-extra-logging", "--extra-logging-interval"], "extra logging"),
    **dict.fromkeys(["--trace-level", "--trace-output"], "trace recording"),
    **dict.fromkeys(
        [
            "--coordinator-url",
            "--coordinator-advertise-ip",
            "--coordinator-heartbeat-interval",
            "--coordinator-event-reporting",
            "--coordinator-event-flush-interval",
            "--coordinator-event-transport",
            "--coordinator-kafka-bootstrap-servers",
            "--coordinator-kafka-topic",
            "--coordinator-kafka-delivery-timeout",
            "--coordinator-blend-timeout",
            "--coordinator-blend-match-concurrency",
        ],
        "the MP coordinator",
    ),
    **dict.fromkeys(["--format", "--output", "-q", "--quiet"], "start-up metrics output"),
}


class UpstreamFlagError(Exception):
    """An upstream flag (or value) this implementation does not support: one line."""


def refuse(flag: str, why: str) -> UpstreamFlagError:
    return UpstreamFlagError(f"{PREFIX}: {flag} is not supported by this implementation ({why})")


def translate(argv: Sequence[str]) -> list[str]:
    """Our `lmcache server` arguments for ``argv`` (which may use upstream's flags).

    Raises `UpstreamFlagError` for a refused flag or value. Our own flags, and anything
    unknown to both (argparse reports it), pass through untouched.
    """
    out: list[str] = []
    ttls: dict[str, str] = {}
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        flag, eq, inline = arg.partition("=")
        if not flag.startswith("-") or flag in ("-h", "--help"):
            out.append(arg)
            continue
        if flag in REFUSED:
            raise refuse(flag, REFUSED[flag])
        alias, same = ALIASES.get(flag), SAME.get(flag)
        if alias is None and same is None:
            out.append(arg)
            continue
        takes_value = alias is not None or (same is not None and same.takes_value)
        value = inline if eq else None
        if takes_value and value is None:
            if i >= len(args):
                out.append(arg)  # argparse says "expected one argument"
                continue
            value = args[i]
            i += 1
        if same is not None:
            if same.takes_value and value not in same.accepted:
                raise refuse(f"{flag} {value}", same.why or "only the default is")
            continue
        assert alias is not None and value is not None
        if value in alias.refused:
            raise refuse(f"{flag} {value}", alias.refused[value])
        value = alias.values.get(value, value)
        if alias.ours == _TTL:
            ttls[flag] = value
        out += [alias.ours, value]
    _check_ttls(ttls)
    return out


def _check_ttls(ttls: dict[str, str]) -> None:
    """Upstream has three lifetimes (session idle, read lock, write lock); here one
    ``--lock-ttl-s`` bounds a lookup's session with its read locks and a remote writer's
    reservation, so they may be given only with one value."""
    if len(set(ttls.values())) > 1:
        given = ", ".join(f"{k} {v}" for k, v in ttls.items())
        raise UpstreamFlagError(
            f"{PREFIX}: {given}: this implementation has one lock and session lifetime "
            "(--lock-ttl-s); give these flags one value"
        )


def translate_or_exit(argv: Sequence[str]) -> list[str]:
    try:
        return translate(argv)
    except UpstreamFlagError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(2) from None
