"""End-to-end benchmark of a real `lmcache server`, next to same-run ceilings.

    .venv/bin/python benchmarks/server_bench.py [--json out.json] [--l1-size-gb N] [--tokens N]

What it measures, all in one run on this machine:

1. Store and retrieve GB/s through a real ``lmcache server`` subprocess (ZMQ, worker
   pool, POSIX shared memory), for a synthetic engine with Qwen3-14B-like geometry on
   the CPU path: 40 layers, K and V planes, 16-token blocks, 8 KV heads x 128 head dim
   in bf16, i.e. 65536 bytes per block per layer. GB/s = KV bytes moved / wall time of
   the client call (median of ``--reps``, after a warm-up). Each store uses a distinct
   token sequence, so every store really writes; one store/retrieve round trip into
   poisoned blocks is checked byte for byte.
2. Ceilings measured in the same run, interleaved with the server repetitions so that
   background load hits both alike: a plain ``np.copyto`` of the same number of bytes
   between pre-faulted buffers, and an in-process ``ShmTransfer.gather`` / ``scatter``
   of the same block ids, chunk by chunk like the server, into (out of) a pre-faulted
   shared-memory destination like the server's L1 pool. A third row, ``np.copyto`` of
   the same bytes in block-sized (32 KiB) pieces, shows what block granularity costs.
3. Lookup round trip p50/p99 (a fully hitting prompt and a miss) next to a raw pyzmq
   DEALER -> ROUTER round trip to an echo process with the same frame sizes, and
   lookups/s from 16 client threads (one ``LMCacheClient`` each) next to the same
   16-thread raw echo rate.

GB are 10**9 bytes. Internal: ``--echo-server PORT REPLY_BYTES`` runs the echo process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from lmcache.client import LMCacheClient
from lmcache.engine.shm_kv import ShmKVCache
from lmcache.engine.transfer import ShmTransfer
from lmcache.protocol.codec import encode
from lmcache.protocol.messages import Lookup, LookupReply
from lmcache.storage.shm import ShmSegment

# Qwen3-14B-like geometry, adapted to the CPU path.
LAYERS = 40
PLANES = 2  # K and V
BLOCK_TOKENS = 16
KV_HEADS = 8
HEAD_DIM = 128
DTYPE_BYTES = 2  # bf16
BLOCK_BYTES = PLANES * BLOCK_TOKENS * KV_HEADS * HEAD_DIM * DTYPE_BYTES  # 65536, one layer
CHUNK_TOKENS = 256
INSTANCE_ID = 7
MODEL = {"model_name": "Qwen/Qwen3-14B-synthetic", "world_size": 1, "dtype": "bfloat16"}
VOCAB = 151_000
GB = 1e9
CLIENT_THREADS = 16


# ----- small helpers -------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def pct_us(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q) * 1e6)


def spread(xs: list[float]) -> float:
    """(max - min) / median: how noisy a set of repetitions was."""
    return (max(xs) - min(xs)) / median(xs) if xs else 0.0


def token_bytes(n: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return rng.integers(0, VOCAB, size=n, dtype=np.uint32).astype("<u4").tobytes()


class CpuAccount:
    """CPU time used on this machine by processes other than this benchmark and its children.

    Call `done` after every child (server, echo process) has been waited for.
    """

    def __init__(self) -> None:
        self._busy0, self._steal0 = self._machine()
        self._ours0 = self._ours()
        self._wall0 = time.monotonic()

    @staticmethod
    def _machine() -> tuple[float, float]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        tick = os.sysconf("SC_CLK_TCK")
        user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
        return (user + nice + system + irq + softirq) / tick, steal / tick

    @staticmethod
    def _ours() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def done(self) -> dict[str, float]:
        busy, steal = self._machine()
        wall = time.monotonic() - self._wall0
        ours = self._ours() - self._ours0
        others = max(0.0, busy - self._busy0 - ours)
        cpus = os.cpu_count() or 1
        return {
            "wall_s": wall,
            "ours_cpu_s": ours,
            "others_cpu_s": others,
            "others_share": others / (wall * cpus),
            "steal_s": steal - self._steal0,
        }


def prefaulted_segment(nbytes: int) -> ShmSegment:
    """A tmpfs segment like the server's L1 pool (created with MAP_POPULATE)."""
    return ShmSegment.create(f"/lmcache_bench_{os.getpid()}_{nbytes}", nbytes)


# ----- the server subprocess -------------------------------------------------------------


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    startup_s: float
    _log_offset: int = 0

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def new_log(self) -> str:
        """Log text written since the previous call."""
        with self.log_path.open("rb") as f:
            f.seek(self._log_offset)
            data = f.read()
        self._log_offset += len(data)
        return data.decode(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return -9


def start_server(l1_size_gb: float) -> Server:
    port, http_port = free_port(), free_port()
    log = Path(tempfile.mkstemp(prefix="lmcache-bench-server-", suffix=".log")[1])
    cmd = [
        sys.executable,
        "-m",
        "lmcache.cli",
        "server",
        "--port",
        str(port),
        "--http-port",
        str(http_port),
        "--http-host",
        "127.0.0.1",
        "--l1-size-gb",
        str(l1_size_gb),
        "--chunk-size",
        str(CHUNK_TOKENS),
        "--lock-ttl-s",
        "120",
    ]
    t0 = time.perf_counter()
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    server = Server(proc, port, log, 0.0)
    deadline = time.monotonic() + 120
    while "LMCache cache server is running..." not in server.log():
        if proc.poll() is not None or time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"server did not start:\n{server.log()}")
        time.sleep(0.05)
    server.startup_s = time.perf_counter() - t0
    server.new_log()
    return server


_LOG_SECONDS = re.compile(r"(Stored|Retrieved) (\d+) tokens in ([0-9.]+) seconds")


def logged_seconds(text: str, verb: str) -> float | None:
    """The server's own copy time for the last ``verb`` line in ``text`` (ms precision)."""
    found = [float(m[3]) for m in _LOG_SECONDS.finditer(text) if m[1] == verb]
    return found[-1] if found else None


# ----- raw ZMQ echo (the round-trip floor) ------------------------------------------------


def echo_server(port: int, reply_bytes: int) -> None:
    """ROUTER that answers every frame with its first ``reply_bytes`` bytes; b"stop" ends it."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(f"tcp://127.0.0.1:{port}")
    while True:
        identity, frame = sock.recv_multipart()
        if frame == b"stop":
            sock.send_multipart([identity, b"bye"])
            break
        sock.send_multipart([identity, frame[:reply_bytes]])
    sock.close(linger=0)
    ctx.term()


class RawZmq:
    """A DEALER doing plain send/recv round trips to the echo process."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], port: int, payload: bytes) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVTIMEO, 10_000)
        self.sock.connect(f"tcp://127.0.0.1:{port}")
        self.payload = payload

    def call(self) -> bytes:
        self.sock.send(self.payload)
        return self.sock.recv()

    def close(self) -> None:
        self.sock.close(linger=0)


def start_echo(reply_bytes: int) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    cmd = [sys.executable, __file__, "--echo-server", str(port), str(reply_bytes)]
    proc = subprocess.Popen(cmd)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    probe = RawZmq(ctx, port, b"ready?")
    probe.sock.setsockopt(zmq.RCVTIMEO, 20_000)
    try:
        probe.call()  # DEALER queues until the ROUTER is bound
    finally:
        probe.close()
    return proc, port


def stop_echo(proc: subprocess.Popen[bytes], port: int) -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    raw = RawZmq(ctx, port, b"stop")
    try:
        raw.call()
    except zmq.Again:
        proc.terminate()
    finally:
        raw.close()
    proc.wait(timeout=10)


# ----- the synthetic engine and the data path ---------------------------------------------


@dataclass
class Bench:
    args: argparse.Namespace
    server: Server
    client: LMCacheClient
    kv: ShmKVCache
    src_ids: np.ndarray
    dst_ids: np.ndarray
    seeds: Any = field(default_factory=lambda: iter(range(1000, 10**9)))
    results: dict[str, Any] = field(default_factory=dict)
    hit_tokens: bytes = b""

    @property
    def tokens(self) -> int:
        return int(self.args.tokens)

    @property
    def kv_bytes(self) -> int:
        return LAYERS * len(self.src_ids) * BLOCK_BYTES

    def fresh_tokens(self) -> bytes:
        return token_bytes(self.tokens, next(self.seeds))

    def store(self, tokens: bytes) -> float:
        ids = self.src_ids.tolist()
        t0 = time.perf_counter()
        reply = self.client.store(
            "bench-store", INSTANCE_ID, tokens, start=0, end=self.tokens, block_ids=ids, timeout=120
        )
        elapsed = time.perf_counter() - t0
        if reply.stored_tokens != self.tokens or reply.no_space:
            raise RuntimeError(f"store did not write every chunk: {reply}")
        return elapsed

    def retrieve(self, tokens: bytes, request_id: str = "bench-retrieve") -> float:
        ids = self.dst_ids.tolist()
        hit = self.client.lookup(request_id, tokens, **MODEL)
        if hit != self.tokens:
            raise RuntimeError(f"lookup before retrieve hit {hit} of {self.tokens} tokens")
        t0 = time.perf_counter()
        got = self.client.retrieve(
            request_id, INSTANCE_ID, tokens, start=0, end=self.tokens, block_ids=ids, timeout=120
        )
        elapsed = time.perf_counter() - t0
        self.client.end_session(request_id)
        if got != self.tokens:
            raise RuntimeError(f"retrieve returned {got} tokens")
        return elapsed


def make_engine(tokens: int) -> tuple[ShmKVCache, np.ndarray, np.ndarray]:
    blocks = tokens // BLOCK_TOKENS
    kv = ShmKVCache(
        num_layers=LAYERS,
        num_blocks=2 * blocks,
        block_size=BLOCK_TOKENS,
        block_bytes=BLOCK_BYTES,
        planes=PLANES,
    )
    # A paged cache hands out scattered blocks: source and destination are shuffled ids.
    perm = np.random.default_rng(0).permutation(2 * blocks).astype(np.intp)
    return kv, perm[:blocks], perm[blocks:]


def verify_roundtrip(b: Bench) -> float:
    """Store random KV, retrieve it into poisoned blocks, compare byte for byte."""
    shape = (LAYERS, PLANES, len(b.src_ids), BLOCK_BYTES // PLANES)
    rng = np.random.default_rng(42)
    data = np.frombuffer(rng.bytes(int(np.prod(shape))), dtype=np.uint8).reshape(shape)
    b.kv.blocks[:, :, b.src_ids] = data
    tokens = b.fresh_tokens()
    b.store(tokens)
    b.kv.blocks[:, :, b.dst_ids] = 0xAB  # poison: the bytes must come from the cache
    t0 = time.perf_counter()
    b.retrieve(tokens, "bench-verify")
    elapsed = time.perf_counter() - t0
    if not np.array_equal(b.kv.blocks[:, :, b.dst_ids], data):
        raise RuntimeError("retrieved KV differs from the stored KV")
    return elapsed


class InProcess:
    """The server's copy loop, run here: same transfer object type, same chunking."""

    def __init__(self, kv: ShmKVCache, src_ids: np.ndarray, dst_ids: np.ndarray) -> None:
        # mapped like the server maps it
        self.segment = ShmSegment.attach(kv.segment.name, kv.segment.token)
        self.transfer = ShmTransfer(kv.layout, [self.segment])
        self.bpc = CHUNK_TOKENS // BLOCK_TOKENS
        self.chunk_shape = (LAYERS, PLANES, self.bpc, BLOCK_BYTES // PLANES)
        self.chunk_bytes = LAYERS * self.bpc * BLOCK_BYTES
        self.chunks = len(src_ids) // self.bpc
        self.l1 = prefaulted_segment(self.chunks * self.chunk_bytes)
        self.src_ids, self.dst_ids = src_ids, dst_ids

    def _chunk(self, i: int) -> np.ndarray:
        view = self.l1.array[i * self.chunk_bytes : (i + 1) * self.chunk_bytes]
        return view.reshape(self.chunk_shape)

    def gather(self) -> float:
        t0 = time.perf_counter()
        for i in range(self.chunks):
            self.transfer.gather(self.src_ids[i * self.bpc : (i + 1) * self.bpc], self._chunk(i))
        return time.perf_counter() - t0

    def scatter(self) -> float:
        t0 = time.perf_counter()
        for i in range(self.chunks):
            self.transfer.scatter(self._chunk(i), self.dst_ids[i * self.bpc : (i + 1) * self.bpc])
        return time.perf_counter() - t0

    def close(self) -> None:
        self.transfer.close()
        self.l1.close()
        self.l1.unlink()


class PlainCopy:
    def __init__(self, nbytes: int) -> None:
        self.a = np.empty(nbytes, dtype=np.uint8)
        self.b = np.empty(nbytes, dtype=np.uint8)
        self.a.fill(1)  # pre-fault both
        self.b.fill(2)

    def copy(self) -> float:
        t0 = time.perf_counter()
        np.copyto(self.b, self.a)
        return time.perf_counter() - t0

    def copy_pieces(self, piece: int) -> float:
        """The same bytes as memcpys of ``piece`` bytes (one block of one plane).

        Explains the gather/scatter ceiling: block-sized copies miss glibc's large-copy
        (non-temporal store) path. Includes ~1 us of Python per piece (~15% here).
        """
        src, dst = self.a.reshape(-1, piece), self.b.reshape(-1, piece)
        t0 = time.perf_counter()
        for i in range(src.shape[0]):
            np.copyto(dst[i], src[i])
        return time.perf_counter() - t0


def bench_transfers(b: Bench) -> None:
    """Server store/retrieve, interleaved rep by rep with the in-process ceilings."""
    inproc = InProcess(b.kv, b.src_ids, b.dst_ids)
    plain = PlainCopy(b.kv_bytes)
    try:
        verify_s = verify_roundtrip(b)
        warm = b.fresh_tokens()  # warm-up: faults every mapping on every path
        b.store(warm)
        b.retrieve(warm)
        inproc.gather()
        inproc.scatter()
        plain.copy()
        piece = BLOCK_BYTES // PLANES
        plain.copy_pieces(piece)
        b.server.new_log()
        t: dict[str, list[float]] = {
            k: [] for k in ("store", "gather", "copyto", "copyto_pieces", "store_server_side")
        }
        last = warm
        for _ in range(b.args.reps):
            last = b.fresh_tokens()
            t["store"].append(b.store(last))
            t["store_server_side"].append(logged_seconds(b.server.new_log(), "Stored") or 0.0)
            t["gather"].append(inproc.gather())
            t["copyto"].append(plain.copy())
            t["copyto_pieces"].append(plain.copy_pieces(piece))
        t.update(retrieve=[], scatter=[], retrieve_server_side=[])
        for _ in range(b.args.reps):
            t["retrieve"].append(b.retrieve(last))
            t["retrieve_server_side"].append(logged_seconds(b.server.new_log(), "Retrieved") or 0.0)
            t["scatter"].append(inproc.scatter())
    finally:
        inproc.close()
    b.results["transfer_seconds"] = t
    b.results["verify_roundtrip_s"] = verify_s
    b.hit_tokens = last  # the lookup phase's fully hitting prompt


# ----- lookups ------------------------------------------------------------------------------


def bench_lookup_latency(b: Bench, raw: RawZmq, hit: bytes, miss: bytes) -> dict[str, list[float]]:
    """Interleaved rounds: raw round trip, hit lookup, miss lookup (each + end_session)."""
    s: dict[str, list[float]] = {"raw": [], "hit": [], "miss": [], "end_session": []}
    c, pc = b.client, time.perf_counter
    for i in range(b.args.lookup_warmup + b.args.lookups):
        t0 = pc()
        raw.call()
        t1 = pc()
        got_hit = c.lookup("lat-hit", hit, **MODEL)
        t2 = pc()
        c.end_session("lat-hit")
        t3 = pc()
        got_miss = c.lookup("lat-miss", miss, **MODEL)
        t4 = pc()
        c.end_session("lat-miss")
        if got_hit != b.tokens or got_miss != 0:
            raise RuntimeError(f"lookup hit {got_hit} (want {b.tokens}), miss {got_miss} (want 0)")
        if i >= b.args.lookup_warmup:
            s["raw"].append(t1 - t0)
            s["hit"].append(t2 - t1)
            s["end_session"].append(t3 - t2)
            s["miss"].append(t4 - t3)
    return s


def run_threads(workers: list[tuple[Callable[[], None], Callable[[], None]]], secs: float) -> float:
    """Run every worker's step in a loop on its own thread for ``secs``; return calls/s."""
    n = len(workers)
    barrier = threading.Barrier(n + 1, timeout=30)
    stop = threading.Event()
    counts = [0] * n
    errors: list[BaseException] = []

    def body(i: int) -> None:
        step, close = workers[i]
        try:
            barrier.wait()
            done = 0
            while not stop.is_set():
                step()
                done += 1
            counts[i] = done
        except BaseException as exc:
            errors.append(exc)
        finally:
            close()

    threads = [threading.Thread(target=body, args=(i,), daemon=True) for i in range(n)]
    for th in threads:
        th.start()
    barrier.wait()
    t0 = time.perf_counter()
    time.sleep(secs)
    stop.set()
    for th in threads:
        th.join(timeout=60)
    elapsed = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} client threads failed; first: {errors[0]!r}")
    return sum(counts) / elapsed


def lookup_workers(
    b: Bench, hit: bytes, with_end: bool
) -> list[tuple[Callable[[], None], Callable[[], None]]]:
    out = []
    for i in range(CLIENT_THREADS):
        client = LMCacheClient.connect("127.0.0.1", b.server.port, timeout=30)
        rid = f"conc-{with_end}-{i}"

        def step(client: LMCacheClient = client, rid: str = rid) -> None:
            got = client.lookup(rid, hit, **MODEL)
            if got != b.tokens:
                raise RuntimeError(f"concurrent lookup hit {got} tokens")
            if with_end:
                client.end_session(rid)

        def close(client: LMCacheClient = client, rid: str = rid) -> None:
            client.end_session(rid)  # a repeated lookup replaced the session; drop the last
            client.close()

        out.append((step, close))
    return out


def raw_workers(port: int, payload: bytes) -> list[tuple[Callable[[], None], Callable[[], None]]]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    out: list[tuple[Callable[[], None], Callable[[], None]]] = []
    for _ in range(CLIENT_THREADS):
        raw = RawZmq(ctx, port, payload)

        def step(raw: RawZmq = raw) -> None:
            raw.call()

        out.append((step, raw.close))
    return out


def bench_lookups(b: Bench) -> None:
    hit = b.hit_tokens
    miss = b.fresh_tokens()
    frame = encode(Lookup(id=10**9, request_id="lat-hit", tokens=hit, **MODEL))
    reply = encode(LookupReply(id=10**9, hit_tokens=b.tokens))
    echo, port = start_echo(len(reply))
    raw = RawZmq(zmq.Context.instance(), port, frame)
    try:
        lat = bench_lookup_latency(b, raw, hit, miss)
        secs = b.args.concurrency_seconds
        rates = {
            "raw_zmq": run_threads(raw_workers(port, frame), secs),
            "lookup": run_threads(lookup_workers(b, hit, with_end=False), secs),
            "lookup_end_session": run_threads(lookup_workers(b, hit, with_end=True), secs),
        }
    finally:
        raw.close()
        stop_echo(echo, port)
    b.results["lookup_seconds"] = lat
    b.results["concurrent_per_s"] = rates
    b.results["frame_bytes"] = {"lookup_request": len(frame), "lookup_reply": len(reply)}


# ----- report ---------------------------------------------------------------------------------


def summarize(b: Bench) -> list[dict[str, Any]]:
    t, lat, rate = (
        b.results[k] for k in ("transfer_seconds", "lookup_seconds", "concurrent_per_s")
    )
    gbs = {k: b.kv_bytes / median(v) / GB for k, v in t.items() if median(v) > 0}
    p = {k: (pct_us(v, 50), pct_us(v, 99)) for k, v in lat.items()}

    thr = f"{CLIENT_THREADS} threads"
    pieces = f"copyto in {BLOCK_BYTES // PLANES // 1024} KiB pieces"
    specs: list[tuple[str, float, str, str, float]] = [
        ("store", gbs["store"], "GB/s", "in-process gather", gbs["gather"]),
        ("store", gbs["store"], "GB/s", "np.copyto", gbs["copyto"]),
        ("retrieve", gbs["retrieve"], "GB/s", "in-process scatter", gbs["scatter"]),
        ("retrieve", gbs["retrieve"], "GB/s", "np.copyto", gbs["copyto"]),
        ("store, server-side copy", gbs.get("store_server_side", 0.0), "GB/s",
         "in-process gather", gbs["gather"]),
        ("retrieve, server-side copy", gbs.get("retrieve_server_side", 0.0), "GB/s",
         "in-process scatter", gbs["scatter"]),
        ("in-process gather", gbs["gather"], "GB/s", "np.copyto", gbs["copyto"]),
        ("in-process scatter", gbs["scatter"], "GB/s", "np.copyto", gbs["copyto"]),
        ("in-process gather", gbs["gather"], "GB/s", pieces, gbs["copyto_pieces"]),
        ("in-process scatter", gbs["scatter"], "GB/s", pieces, gbs["copyto_pieces"]),
        ("lookup hit p50", p["hit"][0], "us", "raw zmq p50", p["raw"][0]),
        ("lookup hit p99", p["hit"][1], "us", "raw zmq p99", p["raw"][1]),
        ("lookup miss p50", p["miss"][0], "us", "raw zmq p50", p["raw"][0]),
        ("lookup miss p99", p["miss"][1], "us", "raw zmq p99", p["raw"][1]),
        ("end_session p50", p["end_session"][0], "us", "raw zmq p50", p["raw"][0]),
        (f"lookups/s, {thr}", rate["lookup"], "/s", f"raw zmq/s, {thr}", rate["raw_zmq"]),
        (f"lookup+end_session/s, {thr}", rate["lookup_end_session"], "/s",
         f"raw zmq/s, {thr}", rate["raw_zmq"]),
    ]  # fmt: skip
    keys = ("metric", "value", "unit", "ceiling", "ceiling_value")
    rows = [dict(zip(keys, spec, strict=True)) for spec in specs]
    for r in rows:
        r["ratio"] = r["value"] / r["ceiling_value"] if r["ceiling_value"] else None
    return rows


def print_table(b: Bench, rows: list[dict[str, Any]]) -> None:
    t = b.results["transfer_seconds"]
    print(
        f"\nKV per call: {b.tokens} tokens = {b.kv_bytes / 1e6:.1f} MB "
        f"({LAYERS} layers x {len(b.src_ids)} blocks x {BLOCK_BYTES} B); "
        f"median of {b.args.reps} reps after a warm-up; GB = 1e9 B"
    )
    print(f"{'metric':<36}{'result':>14}  {'ceiling (same run)':<28}{'value':>12}{'ratio':>8}")
    print("-" * 98)
    for r in rows:
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}"
        val = f"{r['value']:,.2f} {r['unit']}"
        cval = f"{r['ceiling_value']:,.2f}"
        print(f"{r['metric']:<36}{val:>14}  {r['ceiling']:<28}{cval:>12}{ratio:>8}")
    print("-" * 98)
    for k in ("store", "retrieve", "gather", "scatter", "copyto", "copyto_pieces"):
        ms = ", ".join(f"{x * 1e3:.0f}" for x in t[k])
        print(f"  {k:<13} reps (ms): {ms}   spread {spread(t[k]):.0%}")
    noisy = [k for k in ("store", "retrieve", "gather", "scatter", "copyto") if spread(t[k]) > 0.25]
    cpu = b.results["cpu"]
    print(
        f"  other processes used {cpu['others_cpu_s']:.1f} CPU-s during the {cpu['wall_s']:.0f} s"
        f" run ({cpu['others_share']:.0%} of {os.cpu_count()} CPUs; this benchmark and its"
        f" server used {cpu['ours_cpu_s']:.1f} CPU-s; steal {cpu['steal_s']:.1f} s)"
    )
    if noisy or cpu["others_share"] > 0.1:
        cause = (
            "other processes competed for the CPUs"
            if cpu["others_share"] > 0.1
            else "not from other processes: memory-bandwidth / VM variance"
        )
        print(f"  NOTE: noisy run: reps spread >25% for {noisy or 'none'} ({cause})")


def to_json(b: Bench, rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "config": {
            "layers": LAYERS,
            "planes": PLANES,
            "block_tokens": BLOCK_TOKENS,
            "block_bytes_per_layer": BLOCK_BYTES,
            "chunk_tokens": CHUNK_TOKENS,
            "tokens": b.tokens,
            "kv_bytes_per_call": b.kv_bytes,
            "reps": b.args.reps,
            "l1_size_gb": b.args.l1_size_gb,
            "lookups": b.args.lookups,
            "client_threads": CLIENT_THREADS,
            "concurrency_seconds": b.args.concurrency_seconds,
        },
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "pyzmq": zmq.__version__,
            "cpu_accounting": b.results["cpu"],
        },
        "server": {"startup_s": b.server.startup_s, "exit_code": b.results.get("exit_code")},
        "rows": rows,
        "raw": {
            k: b.results[k]
            for k in (
                "transfer_seconds",
                "lookup_seconds",
                "concurrent_per_s",
                "frame_bytes",
                "verify_roundtrip_s",
            )
        },
    }


# ----- main ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--l1-size-gb", type=float, default=4.0, help="server L1 pool (GiB)")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per store/retrieve/lookup")
    p.add_argument("--reps", type=int, default=7, help="timed store/retrieve repetitions")
    p.add_argument("--lookups", type=int, default=2000, help="timed lookup rounds")
    p.add_argument("--lookup-warmup", type=int, default=200, help="untimed lookup rounds")
    p.add_argument(
        "--concurrency-seconds",
        type=float,
        default=3.0,
        help="seconds per 16-thread throughput phase",
    )
    p.add_argument("--echo-server", nargs=2, type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.echo_server is None and (args.tokens <= 0 or args.tokens % CHUNK_TOKENS):
        p.error(f"--tokens must be a positive multiple of {CHUNK_TOKENS}")
    return args


def run(args: argparse.Namespace) -> int:
    cpu = CpuAccount()
    kv, src_ids, dst_ids = make_engine(args.tokens)
    try:
        server = start_server(args.l1_size_gb)
    except BaseException:
        kv.close()
        raise
    print(
        f"server up in {server.startup_s:.1f}s (L1 {args.l1_size_gb:g} GiB, pid {server.proc.pid})"
    )
    client = LMCacheClient.connect("127.0.0.1", server.port, timeout=30)
    b = Bench(args, server, client, kv, src_ids, dst_ids)
    try:
        client.register(INSTANCE_ID, rank=0, layout=kv.layout, memory=kv.memory, **MODEL)
        bench_transfers(b)
        print("store/retrieve done (byte-exact round trip verified)")
        bench_lookups(b)
    finally:
        client.close()
        code = server.stop()
        kv.close()
        b.results["exit_code"] = code
    b.results["cpu"] = cpu.done()
    rows = summarize(b)
    print_table(b, rows)
    print(f"server stopped with SIGTERM: exit code {code}")
    if args.json:
        args.json.write_text(json.dumps(to_json(b, rows), indent=2))
        print(f"wrote {args.json}")
    if code != 0:
        print(f"server log:\n{server.log()[-4000:]}", file=sys.stderr)
        return 1
    server.log_path.unlink(missing_ok=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.echo_server is not None:
        echo_server(*args.echo_server)
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
