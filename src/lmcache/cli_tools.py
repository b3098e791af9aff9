"""Operator commands beside `lmcache server`: ``ping``, ``describe``, ``query``, ``kvcache``.

    lmcache ping [kvcache] [--host H --port P]     ZMQ ping: version, chunk size, round trip
    lmcache ping kvcache --url http://h:8080      HTTP GET /healthcheck (as upstream does)
    lmcache ping engine [--url http://h:8000]     the serving engine's GET /health
    lmcache describe [kvcache] [--url URL]        a readable summary of GET /status
    lmcache query [kvcache] --tokens 1,2,3        how many leading tokens are cached
    lmcache kvcache clear [--url URL]             POST /cache/clear (L1)

Each takes ``--format table|json`` (upstream's ``terminal`` is ``table``), ``--output
PATH`` and ``-q`` (exit code only). Exit codes: 0 done, 1 the server is down or answered
with an error (one line on stderr says which), 2 bad usage.

Only the standard library is imported here at module level: `lmcache.cli` builds these
parsers on every start, `lmcache server` included, and must stay light. The ZMQ client is
imported by the commands that use it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from typing import Any

DEFAULT_HTTP = "http://localhost:8080"
DEFAULT_ENGINE = "http://localhost:8000"
MAX_QUERY_TOKENS = 2_097_152  # the server's own bound on one request (README, Limits)
FORMATS = ("table", "json", "terminal")


class ToolError(Exception):
    """What went wrong, in one line for stderr (exit code 1)."""


def add_tool_commands(sub: Any) -> None:
    """Add the commands to ``lmcache``'s subparsers."""
    ping = sub.add_parser("ping", help="is the server up? (ZMQ ping, or HTTP with --url)")
    ping.add_argument("target", nargs="?", default="kvcache", choices=["kvcache", "engine"])
    _zmq_args(ping)
    ping.add_argument("--url", help="ping over HTTP instead: GET URL/healthcheck (kvcache) "
                      f"or URL/health (engine, default {DEFAULT_ENGINE})")  # fmt: skip
    describe = sub.add_parser("describe", help="a readable summary of the server's /status")
    describe.add_argument("target", nargs="?", default="kvcache", choices=["kvcache"])
    describe.add_argument("--url", default=DEFAULT_HTTP, help=f"HTTP frontend ({DEFAULT_HTTP})")
    query = sub.add_parser("query", help="how many leading tokens of a prompt are cached")
    query.add_argument("target", nargs="?", default="kvcache", choices=["kvcache"])
    _zmq_args(query)
    query.add_argument("--tokens", help="token ids, comma or space separated")
    query.add_argument(
        "--tokens-file",
        help="a file of token ids (a JSON list, or separated by commas/whitespace); "
        "'-' = stdin (the default when neither is given)",
    )
    query.add_argument("--model", help="model name (default: the only one registered)")
    query.add_argument("--world-size", type=int, help="KV world size (with --model; default 1)")
    query.add_argument("--dtype", help="KV dtype, e.g. bfloat16 (with --model)")
    query.add_argument("--kv-spec", default=None, help="the engine's layout fingerprint")
    query.add_argument("--cache-salt", default="", help="the request's cache_salt")
    query.add_argument("--url", default=DEFAULT_HTTP,
                       help="HTTP frontend, read to find the registered model when --model is "
                       f"not given ({DEFAULT_HTTP})")  # fmt: skip
    kvcache = sub.add_parser("kvcache", help="manage the cached KV data")
    actions = kvcache.add_subparsers(dest="action", required=True)
    clear = actions.add_parser("clear", help="clear cached KV data (POST /cache/clear)")
    clear.add_argument("--url", default=DEFAULT_HTTP, help=f"HTTP frontend ({DEFAULT_HTTP})")
    clear.add_argument("--tier", default="l1", choices=["l1", "l2", "all"])
    clear.add_argument("--force", action="store_true", help="also objects locked by lookups")
    clear.add_argument("--token", help="admin token for a non-loopback server (better: "
                       "LMCACHE_ADMIN_TOKEN)")  # fmt: skip
    for parser in (ping, describe, query, kvcache, clear):
        _output_args(parser)


def _zmq_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="localhost", help="server host (ZMQ)")
    parser.add_argument("--port", type=int, default=5555, help="server ZMQ port (5555)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait (5)")


def _output_args(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS on the subcommand: `lmcache kvcache -q clear` and `... clear -q` both work.
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default=argparse.SUPPRESS,
        help="stdout format: table (default; upstream's 'terminal') or json",
    )
    parser.add_argument(
        "--output", metavar="PATH", default=argparse.SUPPRESS, help="also write the result to PATH"
    )
    parser.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="print nothing; the exit code says it all")  # fmt: skip


def run_tool(command: str, args: argparse.Namespace) -> int:
    runners = {"ping": _ping, "describe": _describe, "query": _query, "kvcache": _clear}
    try:
        title, rows = runners[command](args)
    except ToolError as exc:
        print(f"lmcache {command}: {exc}", file=sys.stderr)
        return 1
    _emit(title, rows, args)
    return 0


# ----- commands ---------------------------------------------------------------------------


def _ping(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    if args.target == "engine" or args.url:
        base = _base(args.url or DEFAULT_ENGINE)
        path = "/health" if args.target == "engine" else "/healthcheck"
        t0 = time.monotonic()
        _http("GET", base + path, timeout=args.timeout)
        rtt = (time.monotonic() - t0) * 1000
        return f"Ping {args.target}", {"status": "OK", "url": base, "round_trip_ms": round(rtt, 2)}
    from lmcache.client import LMCacheClient
    from lmcache.errors import LMCacheError

    client = LMCacheClient.connect(args.host, args.port, timeout=args.timeout)
    try:
        client.ping()  # the first call may move to the local endpoint: time the second
        t0 = time.monotonic()
        pong = client.ping()
        rtt = (time.monotonic() - t0) * 1000
    except LMCacheError as exc:
        raise ToolError(f"no LMCache server at {args.host}:{args.port}: {exc}") from None
    finally:
        client.close()
    return "Ping kvcache", {
        "status": "OK", "endpoint": client.endpoint, "version": pong.version,
        "chunk_size": pong.chunk_size, "round_trip_ms": round(rtt, 3),
    }  # fmt: skip


def _describe(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    base = _base(args.url)
    s = _http("GET", base + "/status")
    l1, config = s.get("l1", {}), s.get("config", {})
    cap, used = l1.get("capacity_bytes") or 0, l1.get("used_bytes") or 0
    adapters = s.get("l2_adapters", [])
    models = sorted({f"{e['model_name']} (world {e['world_size']})" for e in s.get("engines", [])})
    return "LMCache server", {
        "health": "OK" if s.get("healthy") else "UNHEALTHY: " + "; ".join(s.get("problems", [])),
        "url": base,
        "version": s.get("version"),
        "instance_id": s.get("instance_id"),
        "uptime_s": s.get("uptime_s"),
        "zmq_endpoint": s.get("zmq_endpoint"),
        "chunk_size": config.get("chunk_size"),
        "l1_capacity_gb": round(cap / (1 << 30), 3),
        "l1_used": f"{used / (1 << 30):.3f} GB ({100 * used / cap if cap else 0:.1f}%)",
        "l1_objects": l1.get("objects"),
        "l1_locked_objects": l1.get("locked"),
        "l1_evictions": l1.get("evictions"),
        "eviction_policy": l1.get("eviction_policy"),
        "l2_adapters": ", ".join(_adapter_line(a) for a in adapters) or "none",
        "engines": len(s.get("engines", [])),
        "models": ", ".join(models) or "none",
        "active_sessions": s.get("sessions", {}).get("active"),
    }


def _adapter_line(adapter: dict[str, Any]) -> str:
    name = adapter.get("name") or adapter.get("type") or "?"
    return f"{name} ({'up' if adapter.get('healthy', True) else 'down'})"


def _query(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    tokens = _read_tokens(args)
    ident = _identity(args)
    from lmcache.client import LMCacheClient
    from lmcache.errors import LMCacheError

    client = LMCacheClient.connect(args.host, args.port, timeout=args.timeout)
    request_id = f"lmcache-query-{uuid.uuid4().hex}"
    try:
        hit = client.lookup(request_id, tokens, **ident)
        deadline = time.monotonic() + args.timeout
        while hit is None and time.monotonic() < deadline:  # L2 prefetch in progress
            time.sleep(0.01)
            hit = client.query_lookup(request_id)
        client.end_session(request_id)  # release the locks the lookup took
    except LMCacheError as exc:
        raise ToolError(f"LMCache server at {args.host}:{args.port}: {exc}") from None
    finally:
        client.close()
    if hit is None:
        raise ToolError(f"the lookup was still pending after {args.timeout:g} s (L2 prefetch)")
    return "Query kvcache", {
        "model": ident["model_name"], "tokens": len(tokens), "cached_tokens": hit,
        "cached_ratio": round(hit / len(tokens), 4) if tokens else 0.0,
    }  # fmt: skip


def _read_tokens(args: argparse.Namespace) -> list[int]:
    if args.tokens is not None:
        text = args.tokens
    elif args.tokens_file not in (None, "-"):
        try:
            with open(args.tokens_file) as f:
                text = f.read(64 << 20)
        except OSError as exc:
            raise ToolError(f"--tokens-file: {exc}") from None
    else:
        text = sys.stdin.read(64 << 20)
    text = text.strip()
    try:
        values = json.loads(text) if text.startswith("[") else text.replace(",", " ").split()
        tokens = [int(v) for v in values]
    except (ValueError, TypeError):
        raise ToolError(
            "token ids must be integers (a JSON list, or comma/space separated)"
        ) from None
    if not tokens or len(tokens) > MAX_QUERY_TOKENS:
        raise ToolError(f"give between 1 and {MAX_QUERY_TOKENS} token ids, got {len(tokens)}")
    if any(t < 0 or t >= 1 << 32 for t in tokens):
        raise ToolError("token ids must be in [0, 2**32)")
    return tokens


def _identity(args: argparse.Namespace) -> dict[str, Any]:
    """The namespace of the lookup: from the flags, or the one model registered."""
    if args.model:
        if not args.dtype:
            raise ToolError("--dtype is required with --model (e.g. bfloat16)")
        return {
            "model_name": args.model, "world_size": args.world_size or 1, "dtype": args.dtype,
            "kv_spec": args.kv_spec or "", "cache_salt": args.cache_salt,
        }  # fmt: skip
    engines = _http("GET", _base(args.url) + "/status").get("engines", [])
    found = {(e["model_name"], e["world_size"], e["dtype"], e["kv_spec"]) for e in engines}
    if len(found) != 1:
        names = ", ".join(sorted(f"{m} (world {w}, {d})" for m, w, d, _ in found)) or "none"
        raise ToolError(f"give --model and --dtype: registered models: {names}")
    model, world, dtype, spec = found.pop()
    return {
        "model_name": model, "world_size": world, "dtype": dtype,
        "kv_spec": spec if args.kv_spec is None else args.kv_spec, "cache_salt": args.cache_salt,
    }  # fmt: skip


def _clear(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    import os

    token = args.token or os.environ.get("LMCACHE_ADMIN_TOKEN")
    body = {"tier": args.tier, "force": args.force}
    reply = _http("POST", _base(args.url) + "/cache/clear", body, token=token)
    return "KV cache clear", {"status": "OK", **reply.get("cleared", {})}


# ----- plumbing ---------------------------------------------------------------------------


def _base(url: str) -> str:
    return (url if url.startswith(("http://", "https://")) else f"http://{url}").rstrip("/")


def _http(
    method: str, url: str, body: dict[str, Any] | None = None, *, token: str | None = None,
    timeout: float = 10.0,
) -> dict[str, Any]:  # fmt: skip
    import urllib.error  # here: `lmcache server` builds these parsers and needs no HTTP client
    import urllib.request

    headers = {"Content-Type": "application/json"} if body is not None else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read(16 << 20)
    except urllib.error.HTTPError as exc:
        raise ToolError(f"{method} {url}: HTTP {exc.code}: {_reason(exc)}") from None
    except (urllib.error.URLError, OSError) as exc:
        why = getattr(exc, "reason", exc)
        raise ToolError(f"cannot reach {url} (is the server running?): {why}") from None
    try:
        value = json.loads(raw) if raw.strip() else {}
    except ValueError:
        return {}  # vLLM's /health answers with an empty body
    return value if isinstance(value, dict) else {"value": value}


def _reason(exc: Any) -> str:
    """The reason in an HTTP error's JSON body (ours, FastAPI's or upstream's)."""
    try:
        body = json.loads(exc.read(64 << 10))
    except (ValueError, OSError):
        return str(exc.reason)
    if isinstance(body, dict):
        return str(body.get("reason") or body.get("detail") or body.get("reasons") or body)
    return str(body)


def _emit(title: str, rows: dict[str, Any], args: argparse.Namespace) -> None:
    fmt = getattr(args, "format", "table")
    if fmt == "json":
        text = json.dumps(rows, indent=2)
    else:
        width = max(map(len, rows), default=0)
        lines = [f"{k.replace('_', ' ').capitalize():<{width}}  {v}" for k, v in rows.items()]
        text = "\n".join([title, "=" * len(title), *lines])
    if not getattr(args, "quiet", False):
        print(text)
    output = getattr(args, "output", None)
    if output:
        with open(output, "w") as f:
            f.write(text + "\n")
