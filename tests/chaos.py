"""Chaos: engines killed mid-transfer, forced clears, constant eviction and fuzzed frames
against one real server, while every byte that a retrieve reports as good is checked.

    this process (`Chaos`)                                lmcache server (subprocess)
   ┌───────────────────────────────────────┐             ┌─────────────────────────────┐
   │ killer   SIGKILL an engine mid store / │             │ L1 of ~200 chunks: stores   │
   │          retrieve (its phase is in     │             │ evict all the time          │
   │          shared memory), spawn another │             │ --lock-ttl-s 3              │
   │ clearer  POST /clear-cache ────────────┼── HTTP ───> │ --engine-timeout-s 5        │
   │ fuzzer   garbage, random maps, hostile │── ipc:// ─> │                             │
   │          requests; counts the replies  │── tcp:// ─> │                             │
   └──────┬────────────────────────────────┘             └──────────────▲──────────────┘
          │ spawn; stop flag, phase and counters: lock-free shared memory   │ ZMQ + shm
   ┌──────▼──────────────────────────────────────────────────────────────┐  │
   │ engine processes, modes mixed: engine_driven (the server copies our │──┘
   │ shm blocks), lmcache_driven (we copy via the L1 pool), bytes (ZMQ)  │
   │ loop: lookup -> retrieve [0, hit), verify every byte -> store the   │
   │ rest -> end_session                                                 │
   └─────────────────────────────────────────────────────────────────────┘

Chunk k of a prompt holds bytes that are a pure function of the prompt's tokens up to the
end of chunk k (numpy seeded with their sha256), so any engine can verify any chunk. Prompts
are a shared prefix + a shared (or fresh) suffix + a partial tail, so engines hit each
other's chunks. A typed error (miss, transfer_failed, no_space, ...) is fine and counted.
At the end the engines stop; within the lock TTL plus the engine timeout the server must
hold no lock, session, prepared transfer or engine; it must be healthy, have logged no
traceback, and no KV segment of our engines may remain in /dev/shm. The run has a shm
directory of its own (LMCACHE_SHM_DIR), so that no other server's start-up removes our
engines' stale segments for us.

    .venv/bin/python -m tests.chaos --duration 600 --engines 6    # tests/test_chaos.py: short

``--shrink-every S`` makes an engine_driven engine truncate its own KV segment mid store
or retrieve and exit: the server's copy through its mapping must end in an error, not SIGBUS.

``--freeze-every S`` stops an engine with SIGSTOP (preferably an lmcache_driven one copying
into its L1 slots) for longer than the lock TTL and the engine timeout: a stalled worker.
Its late writes must never land in pages that another chunk got meanwhile (they once did:
wrong bytes; the server now keeps an expired store's pages while its writer lives).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import json
import multiprocessing as mp
import os
import random
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import msgspec
import zmq

from lmcache.client import LMCacheClient

from .chaos_engine import (
    CHUNK,
    EXTRAS,
    MODEL,
    MODES,
    N_OPS,
    OPS,
    OUTCOMES,
    PHASES,
    RETRIEVE,
    RETRIEVE_COPY,
    STARTING,
    STORE,
    STORE_COPY,
    EngineSpec,
    engine_main,
    kv_layout,
    prompt_pool,
)

SETTLED = ("l1_locked", "l1_leases", "l1_writing", "l1_doomed_pending", "sessions_active",
           "prepared_transfers", "engines", "in_flight")  # fmt: skip


# ----- the parent's actors ------------------------------------------------------------------


class Fuzzer(threading.Thread):
    """Garbage, random msgpack maps and hostile requests on the local and the TCP endpoint.
    Never a store of real prompt tokens: a trusted peer may write wrong KV (threat model)."""

    def __init__(self, local: str, port: int, seed: int, real_ids: Callable[[], list[int]]) -> None:
        super().__init__(name="fuzzer", daemon=True)
        self.rng, self.real_ids = random.Random(seed), real_ids
        self.endpoints = {"ipc": local, "tcp": f"tcp://127.0.0.1:{port}"}
        self.stop = threading.Event()
        self.counts = {
            f"{e}_{k}": 0 for e in ("ipc", "tcp") for k in ("sent", "answered", "no_reply")
        }
        self.prefixes = [p.tobytes() for p in prompt_pool()[0]]
        self.layout = msgspec.to_builtins(kv_layout())

    def frames(self) -> list[bytes]:
        r = self.rng
        junk, rid = r.randbytes(r.randrange(64)), f"fuzz-{r.randrange(50)}"
        toks = r.choice(self.prefixes) if r.random() < 0.5 else junk[:32]
        real, fake = r.choice(self.real_ids() or [1]), 1_000_000 + r.randrange(2)
        q = {"request_id": rid, "tokens": toks}
        shm = {"type": "shm", "segments": ["/lmcache_kv_1_0"], "tokens": ["00"]}
        messages: list[dict[str, Any]] = [
            {"op": r.choice(["ping", "nope", 7, "store"]), r.choice(["x", "instance_id"]): junk},
            {"op": "ping", "instance_id": fake},  # not real: it would keep frozen engines alive
            {"op": "lookup", **q, **MODEL},  # pins chunks, often forgotten: the TTL frees them
            {"op": r.choice(["query_lookup", "end_session"]), "request_id": rid},
            {"op": "free_lookup", "request_id": rid, "start": CHUNK, "end": 0},
            {"op": "store", **q, "instance_id": real, "start": 1, "end": CHUNK, "block_ids": [0]},
            {"op": "retrieve", **q, "instance_id": real, "start": CHUNK, "end": 0, "block_ids": []},
            {"op": "retrieve_bytes", **q, "instance_id": fake, "start": 0, "end": CHUNK},
            {"op": "store_bytes", **q, "instance_id": fake, "start": 1, "end": CHUNK},
            {"op": "prepare_store", "request_id": rid, "instance_id": fake, "start": 0,
             "end": CHUNK, "tokens": r.randbytes(4 * CHUNK)},  # never committed: the TTL frees it
            {"op": "commit", "instance_id": r.choice([real, fake]),
             "transfer_id": r.getrandbits(62)},
            {"op": "register", "instance_id": fake, "rank": 0, **MODEL,  # silent: reaped later
             "memory": r.choice([{"type": "worker_copy"}, shm]), "layout": self.layout},
        ]  # fmt: skip
        if r.random() < 0.15:
            return [junk]
        msg = {"id": r.randrange(-5, 1 << 40), **r.choice(messages)}
        return [msgspec.msgpack.encode(msg), *([junk] if msg["op"] == "store_bytes" else [])]

    def run(self) -> None:
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        endpoints = self.endpoints

        def connect(endpoint: str) -> zmq.Socket[bytes]:
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(endpoint)
            return sock

        socks = {e: connect(endpoint) for e, endpoint in endpoints.items()}
        while not self.stop.wait(0.01):
            e = self.rng.choice(["ipc", "ipc", "tcp"])
            socks[e].send_multipart(self.frames())
            self.counts[f"{e}_sent"] += 1
            if socks[e].poll(10_000):
                socks[e].recv_multipart()
                self.counts[f"{e}_answered"] += 1
            else:  # a new socket, so that a late reply is not taken for the next one's
                self.counts[f"{e}_no_reply"] += 1
                socks[e].close()
                socks[e] = connect(endpoints[e])
        for sock in socks.values():
            sock.close()
        ctx.term()


class Clearer(threading.Thread):
    def __init__(self, url: str, every: float, seed: int) -> None:
        super().__init__(name="clearer", daemon=True)
        self.url, self.every, self.rng = url, every, random.Random(seed)
        self.stop = threading.Event()
        self.clears = self.failures = 0

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as http:
            while not self.stop.wait(self.rng.uniform(0.5, 1.5) * self.every):
                ok = http.post("/clear-cache").status_code == 200
                self.clears, self.failures = self.clears + ok, self.failures + (not ok)


@dataclasses.dataclass
class ChaosConfig:
    duration: float = 60.0  # seconds of chaos; stopping and settling come on top
    engines: int = 4
    seed: int = 0
    l1_size_gb: float = 0.05
    lock_ttl_s: float = 3.0
    engine_timeout_s: float = 5.0
    kill_every: float = 2.0  # mean seconds between SIGKILLs
    clear_every: float = 3.0
    freeze_every: float = 15.0  # mean seconds between SIGSTOPs; 0: none (module docstring)
    shrink_every: float = 6.0  # mean seconds between engines truncating their segment; 0: none
    fuzz: bool = True


@dataclasses.dataclass
class ChaosResult:
    operations: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    verified_chunks: int = 0
    verified_bytes: int = 0
    wrong_bytes: int = 0
    skip_overwrites: int = 0  # bytes of skipped blocks that a retrieve wrote anyway
    lookup_hit_tokens: int = 0
    reregistered: int = 0
    engines_started: int = 0
    kills: dict[str, int] = dataclasses.field(default_factory=dict)  # by the victim's phase
    freezes: dict[str, int] = dataclasses.field(default_factory=dict)  # SIGSTOP, by phase
    shrinks: dict[str, int] = dataclasses.field(default_factory=dict)  # segment truncated
    engine_crashes: list[str] = dataclasses.field(default_factory=list)
    mismatch_reports: list[str] = dataclasses.field(default_factory=list)
    clears: int = 0
    clear_failures: int = 0
    fuzz: dict[str, int] = dataclasses.field(default_factory=dict)
    server_alive: bool = False
    healthcheck: int = 0
    server_tracebacks: int = 0
    final_status: dict[str, int] = dataclasses.field(default_factory=dict)
    settled_after_s: float | None = None  # seconds after the engines stopped; None: never
    leaked_segments: int = 0
    leaked_segment_names: list[str] = dataclasses.field(default_factory=list)
    server_leftovers: list[str] = dataclasses.field(default_factory=list)  # after its stop
    server_exit_code: int | None = None
    server_log: str = ""
    duration_s: float = 0.0

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    def unexpected_errors(self) -> int:
        return sum(by.get("internal", 0) + by.get("other", 0) for by in self.operations.values())

    def problems(self) -> list[str]:
        checks = {
            "wrong bytes retrieved": self.wrong_bytes + self.skip_overwrites,
            "engines crashed": self.engine_crashes,
            "internal or unexpected errors": self.unexpected_errors(),
            "fuzz frames without a reply": sum(v for k, v in self.fuzz.items() if "no_reply" in k),
            "server died or is unhealthy": not self.server_alive or self.healthcheck != 200,
            "server logged a traceback": self.server_tracebacks,
            "locks, sessions, transfers or engines left": self.settled_after_s is None,
            "KV segments of dead engines left in /dev/shm": self.leaked_segments,
            "server left files behind after its stop": self.server_leftovers,
        }  # fmt: skip
        return [what for what, bad in checks.items() if bad]


@dataclasses.dataclass
class EngineHandle:
    proc: Any
    spec: EngineSpec
    counters: Any
    phase: Any
    killed: bool = False


class Chaos:
    def __init__(self, cfg: ChaosConfig) -> None:
        from .conftest import start_server  # here: engine processes need no pytest

        self.cfg, self.rng, self.began = cfg, random.Random(cfg.seed), time.monotonic()
        self.ctx = mp.get_context("spawn")
        self.shm = tempfile.mkdtemp(prefix="lmcache-chaos-", dir="/dev/shm")
        self.server = start_server(
            "--l1-size-gb", str(cfg.l1_size_gb), "--lock-ttl-s", str(cfg.lock_ttl_s),
            "--engine-timeout-s", str(cfg.engine_timeout_s), env={"LMCACHE_SHM_DIR": self.shm},
        )  # fmt: skip
        with contextlib.closing(LMCacheClient.connect("localhost", self.server.port)) as client:
            local = client.ping().local_endpoint  # ipc://<our shm dir>/lmcache_zmq_<port>.sock
        self.logs = Path(tempfile.mkdtemp(prefix="lmcache-chaos-"))
        self.stop = self.ctx.RawValue("b", 0)
        self.handles: list[EngineHandle] = []
        self.live: dict[int, EngineHandle] = {}  # slot -> the engine running there
        self.result = ChaosResult(server_log=str(self.server.log_path))
        self.frozen: set[int] = set()  # their slots: the fuzzer leaves them alone (silent)
        self.fuzzer = Fuzzer(local, self.server.port, cfg.seed, self.unfrozen_ids)
        self.clearer = Clearer(self.server.url, cfg.clear_every, cfg.seed + 1)

    def unfrozen_ids(self) -> list[int]:
        return [h.spec.instance_id for s, h in list(self.live.items()) if s not in self.frozen]

    def spawn(self, slot: int) -> None:
        iid = 100 + len(self.handles)
        log, mode = str(self.logs / f"{iid}.log"), MODES[slot % len(MODES)]
        spec = EngineSpec(self.server.port, iid, mode, self.cfg.seed * 7919 + iid, self.shm, log)
        counters, phase = self.ctx.RawArray("q", N_OPS + len(EXTRAS)), self.ctx.RawValue("i", 0)
        args = (spec, counters, phase, self.stop)
        proc = self.ctx.Process(target=engine_main, args=args, daemon=True)
        proc.start()
        self.handles.append(h := EngineHandle(proc, spec, counters, phase))
        self.live[slot] = h

    def catch(
        self, wanted: Sequence[int], sig: int, tally: dict[str, int], mode: str = ""
    ) -> int | None:
        """Send ``sig`` to a random engine (of ``mode``, if given) once it is in one of the
        ``wanted`` phases (or any phase, at random; after a second: anyway). Returns its slot."""
        ready = [
            s for s, h in self.live.items()
            if h.phase.value != STARTING and mode in ("", h.spec.mode)
        ]  # fmt: skip
        if not ready:
            return None
        slot = self.rng.choice(ready)
        h, until = self.live[slot], time.monotonic() + 1
        if h.spec.mode != "lmcache_driven":  # only those copy: the others have no such phase
            wanted = [w for w in wanted if w not in (STORE_COPY, RETRIEVE_COPY)]
        want = self.rng.choice([*wanted, STARTING])  # STARTING: at once
        while want not in (STARTING, h.phase.value) and time.monotonic() < until:
            time.sleep(0.0005)
        tally[PHASES[h.phase.value]] = tally.get(PHASES[h.phase.value], 0) + 1
        os.kill(h.proc.pid, sig)
        return slot

    def kill_one(self) -> None:
        """SIGKILL an engine, preferably mid store or mid retrieve, and start another."""
        slot = self.catch(
            [STORE, RETRIEVE, STORE_COPY, RETRIEVE_COPY], signal.SIGKILL, self.result.kills
        )
        if slot is not None:
            self.replace(slot)

    def shrink_one(self) -> None:
        """SIGUSR1 an engine_driven engine mid store or retrieve: it truncates its own KV
        segment under the server's copy and exits (`chaos_engine.shrink_and_exit`)."""
        slot = self.catch([STORE, RETRIEVE], signal.SIGUSR1, self.result.shrinks, "engine_driven")
        if slot is not None:
            self.replace(slot)

    def replace(self, slot: int) -> None:
        """The engine in ``slot`` was ended on purpose: start another."""
        self.live[slot].killed = True
        self.live[slot].proc.join()  # reaped at once: the server watches its pid
        self.spawn(slot)

    def freeze_one(self) -> None:
        """SIGSTOP an engine (preferably one copying into L1) for longer than the lock TTL and
        the engine timeout, then SIGCONT it: a stalled worker, whose slots were reclaimed."""
        slot = self.catch([STORE_COPY] * 4 + [RETRIEVE], signal.SIGSTOP, self.result.freezes)
        if slot is not None:
            self.frozen.add(slot)
            time.sleep(max(self.cfg.lock_ttl_s, self.cfg.engine_timeout_s) + 2)
            os.kill(self.live[slot].proc.pid, signal.SIGCONT)
            self.frozen.discard(slot)

    def run(self) -> ChaosResult:
        try:
            try:
                self.chaos()
            finally:
                self.stop_everything()
            stopped = time.monotonic()
            self.collect()
            self.settle(stopped)
        finally:
            self.check_segments_and_stop_server()
        self.result.duration_s = round(time.monotonic() - self.began, 1)
        return self.result

    def chaos(self) -> None:
        cfg, start = self.cfg, time.monotonic()
        for slot in range(cfg.engines):
            self.spawn(slot)
        for actor in (self.clearer, self.fuzzer) if cfg.fuzz else (self.clearer,):
            actor.start()
        next_kill, next_note = start + 3, start + 10
        next_freeze = start + 5 if cfg.freeze_every else float("inf")
        next_shrink = start + 4 if cfg.shrink_every else float("inf")
        while (now := time.monotonic()) < start + cfg.duration:
            for slot, h in list(self.live.items()):
                if h.proc.exitcode is not None:  # died by itself: a crash, reported at the end
                    self.spawn(slot)
            if now >= next_kill:
                self.kill_one()
                next_kill = time.monotonic() + self.rng.expovariate(1 / cfg.kill_every)
            if now >= next_shrink:
                self.shrink_one()
                next_shrink = time.monotonic() + self.rng.expovariate(1 / cfg.shrink_every)
            if now >= next_freeze:
                self.freeze_one()
                next_freeze = time.monotonic() + self.rng.expovariate(1 / cfg.freeze_every)
            if now >= next_note:
                ops = sum(sum(h.counters[:N_OPS]) for h in self.handles)
                print(f"chaos: {now - start:.0f} s, {ops} operations, kills {self.result.kills}, "
                      f"{self.clearer.clears} clears, fuzz {self.fuzzer.counts}",
                      file=sys.stderr)  # fmt: skip
                next_note = now + 10
            time.sleep(0.02)

    def stop_everything(self) -> None:
        self.stop.value = 1
        self.fuzzer.stop.set()
        self.clearer.stop.set()
        for h in self.handles:
            h.proc.join(timeout=60)
            if h.proc.exitcode is None:
                h.proc.kill()
                h.proc.join()
                self.result.engine_crashes.append(f"engine {h.spec.instance_id} did not stop")
        for actor in (self.fuzzer, self.clearer):
            if actor.ident is not None:
                actor.join(timeout=30)

    def collect(self) -> None:
        r = self.result
        for h in self.handles:
            log = Path(h.spec.log).read_text() if Path(h.spec.log).exists() else ""
            if not h.killed and h.proc.exitcode != 0:
                r.engine_crashes.append(f"engine {h.spec.instance_id} ({h.spec.mode}) exited "
                                        f"{h.proc.exitcode}: {log[-3000:]}")  # fmt: skip
            elif log:
                r.mismatch_reports.append(f"engine {h.spec.instance_id}: {log[-3000:]}")
            for i, (op, outcome) in enumerate((o, c) for o in OPS for c in OUTCOMES):
                if h.counters[i]:
                    by = r.operations.setdefault(f"{h.spec.mode}.{op}", {})
                    by[outcome] = by.get(outcome, 0) + h.counters[i]
            for i, name in enumerate(EXTRAS):
                setattr(r, name, getattr(r, name) + h.counters[N_OPS + i])
            with contextlib.suppress(FileNotFoundError):
                os.unlink(h.spec.log)
        with contextlib.suppress(OSError):
            self.logs.rmdir()
        r.engines_started, r.fuzz = len(self.handles), self.fuzzer.counts
        r.clears, r.clear_failures = self.clearer.clears, self.clearer.failures

    def settle(self, stopped: float) -> None:
        """Locks expire after the TTL, silent engines after the timeout: poll until zero."""
        # (3 TTLs: an expired store of a live writer keeps its pages 2 TTLs more, worker_copy.py)
        r, deadline = self.result, stopped + 3 * self.cfg.lock_ttl_s + self.cfg.engine_timeout_s + 5
        with httpx.Client(base_url=self.server.url, timeout=30) as http:
            while True:
                status = http.get("/status").json()
                l1 = status["l1"]
                pool = next(w for w in status["workers"] if w["name"] == "worker-pool")
                r.final_status = {
                    **{f"l1_{k}": int(l1[k]) for k in ("locked", "leases", "writing",
                                                       "doomed_pending", "objects", "evictions")},
                    "sessions_active": status["sessions"]["active"], "in_flight": pool["in_flight"],
                    "prepared_transfers": status["prepared_transfers"],
                    "engines": len(status["engines"]),
                }  # fmt: skip
                if not any(r.final_status[k] for k in SETTLED):
                    r.settled_after_s = round(time.monotonic() - stopped, 1)
                    break
                if time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            r.server_alive = self.server.proc.poll() is None
            r.healthcheck = http.get("/healthcheck").status_code

    def check_segments_and_stop_server(self) -> None:
        """Then remove what is left in the run's shm dir: our engines' segments, and what our
        own server left behind after its stop (reported: it should leave nothing)."""
        r, pids = self.result, [h.proc.pid for h in self.handles]
        ours = [p for pid in pids for p in glob.glob(f"{self.shm}/lmcache_kv_{pid}_*")]
        r.leaked_segments, r.leaked_segment_names = len(ours), sorted(map(os.path.basename, ours))
        r.server_exit_code = self.server.stop()
        r.server_tracebacks = self.server.log().count("Traceback")
        r.server_leftovers = sorted(set(os.listdir(self.shm)) - set(r.leaked_segment_names))
        for name in os.listdir(self.shm):  # all of it ours: created by this run's processes
            os.unlink(os.path.join(self.shm, name))
        os.rmdir(self.shm)


def run(cfg: ChaosConfig) -> ChaosResult:
    return Chaos(cfg).run()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    for f in dataclasses.fields(ChaosConfig):
        default, flag = getattr(ChaosConfig(), f.name), "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        else:
            parser.add_argument(flag, type=type(default), default=default)
    result = run(ChaosConfig(**vars(parser.parse_args(argv))))
    print(result.to_json(), flush=True)
    for problem in result.problems():
        print(f"chaos: FAILED: {problem}", file=sys.stderr)
    return 1 if result.problems() else 0


if __name__ == "__main__":
    sys.exit(main())
