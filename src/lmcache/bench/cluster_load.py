"""Continuous traffic through several `lmcache server`s that share one Redis Cluster, with a
byte-for-byte check of every hit, and what each cluster event did to it.

Each server stands for one host: its own ``LMCACHE_SHM_DIR`` and its own synthetic
engine, so the servers share nothing but the cluster::

    load thread, step k:  host k%n stores a new prompt (random blocks, unique tokens)
                          host (w+1)%n looks up and retrieves a prompt host w stored
                          >= ``lag_s`` ago (never seen by that reader: an L2 read), and
                          compares every retrieved byte with what was stored
    health thread:        GET /healthcheck of every server every 0.2 s

`Figures.of` cuts the records at each event's start: reads, full hits, misses, errors and
wrong bytes in that window, whether any server said unhealthy (503) or degraded, and
``resume_s``: from the event's start to the first full hit of a prompt *stored after* it
(so both the write path and the read path work again).

Used by ``tests/test_redis_cluster.py`` (short) and ``benchmarks/redis_cluster_failover.py``.
"""

from __future__ import annotations

import collections
import contextlib
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lmcache.client import LMCacheClient
from lmcache.cluster_processes import RedisCluster
from lmcache.engine.shm_kv import ShmKVCache
from lmcache.processes import ServerProcess

CHUNK = 256  # tokens per chunk (the server's default)
BLOCK = 16  # tokens per block
MODEL = "cluster-load"


@contextlib.contextmanager
def shm_dir(path: str | None) -> Iterator[None]:
    """``LMCACHE_SHM_DIR`` set to ``path`` for a moment (None: left as it is), so that an
    engine's segment is made where its host's server looks."""
    if path is None:
        yield
        return
    before = os.environ.get("LMCACHE_SHM_DIR")
    os.environ["LMCACHE_SHM_DIR"] = path
    try:
        yield
    finally:
        if before is None:
            del os.environ["LMCACHE_SHM_DIR"]
        else:
            os.environ["LMCACHE_SHM_DIR"] = before


@dataclass
class Host:
    """One server, its engine (in the server's shm dir) and a client registered with it."""

    server: ServerProcess
    engine: ShmKVCache
    client: LMCacheClient
    iid: int
    shm: str | None = None

    @classmethod
    def attach(
        cls, server: ServerProcess, iid: int, shm: str | None = None, block_bytes: int = 4096
    ) -> Host:
        with shm_dir(shm):
            engine = ShmKVCache(
                num_layers=4, num_blocks=128, block_size=BLOCK, block_bytes=block_bytes
            )
        client = LMCacheClient.connect("localhost", server.port, timeout=10.0)
        client.register(
            iid, model_name=MODEL, world_size=1, rank=0, dtype="bfloat16",
            layout=engine.layout, memory=engine.memory,
        )  # fmt: skip
        return cls(server, engine, client, iid, shm)

    def close(self) -> None:
        self.client.close()
        with shm_dir(self.shm):
            self.engine.close()


@dataclass
class Read:
    t: float  # when the lookup started (monotonic)
    stored_t: float  # when the prompt's store started
    full: bool
    hit_tokens: int
    wrong_bytes: int
    error: str | None


@dataclass
class Event:
    name: str
    t: float
    took_s: float = 0.0  # how long the action itself took (e.g. until failover)
    l2_errors: int = 0  # the servers' L2 adapter errors (sum) when the event started


@dataclass
class Load:
    """The load thread, the health thread and what they recorded."""

    hosts: list[Host]
    chunks: int = 3
    lag_s: float = 0.5
    reads: list[Read] = field(default_factory=list)
    stores: int = 0
    store_errors: int = 0
    health: list[tuple[float, int, bool]] = field(default_factory=list)  # t, code, degraded
    events: list[Event] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> Load:
        self._threads = [
            threading.Thread(target=self._traffic, daemon=True, name="cluster-load"),
            threading.Thread(target=self._watch, daemon=True, name="cluster-health"),
        ]
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)

    def event(self, name: str) -> Event:
        e = Event(name, time.monotonic(), l2_errors=self.l2_errors())
        self.events.append(e)
        return e

    def l2_errors(self) -> int:
        return sum(int(l2_status(h.server)["errors"]) for h in self.hosts)

    def last_errors(self) -> list[str | None]:
        return [l2_status(h.server)["last_error"] for h in self.hosts]

    def wait_resumed(self, event: Event, timeout: float) -> float | None:
        """Seconds from ``event`` until a prompt stored after it was a full hit; None if
        not within ``timeout``."""
        deadline = event.t + timeout
        while time.monotonic() < deadline:
            for r in list(self.reads):
                if r.stored_t >= event.t and r.full:
                    return r.t - event.t
            time.sleep(0.1)
        return None

    # ----- threads -------------------------------------------------------------------------

    def _traffic(self) -> None:
        n, rng, k = len(self.hosts), np.random.default_rng(1), 0
        blocks = self.chunks * CHUNK // BLOCK
        stored: collections.deque[tuple[float, int, np.ndarray, np.ndarray]] = collections.deque()
        while not self._stop.is_set():
            w = k % n
            host = self.hosts[w]
            tokens = rng.integers(0, 50_000, size=self.chunks * CHUNK, dtype=np.uint32)
            host.engine.blocks[:, :, :blocks] = rng.integers(
                0, 256, size=host.engine.blocks[:, :, :blocks].shape, dtype=np.uint8
            )
            t = time.monotonic()
            try:
                host.client.store(
                    f"s{k}", host.iid, tokens, start=0, end=len(tokens), block_ids=range(blocks)
                )
                self.stores += 1
                stored.append((t, w, tokens, host.engine.blocks[:, :, :blocks].copy()))
            except Exception:
                self.store_errors += 1
            while stored and stored[0][0] <= time.monotonic() - self.lag_s:
                st, writer, old_tokens, original = stored.popleft()
                self.reads.append(self._read(f"r{k}", (writer + 1) % n, st, old_tokens, original))
            k += 1
            if len(stored) > 1000:  # reads are failing: keep memory bounded
                stored.popleft()

    def _read(
        self, rid: str, reader: int, stored_t: float, tokens: np.ndarray, original: np.ndarray
    ) -> Read:
        host, t = self.hosts[reader], time.monotonic()
        try:
            hit = host.client.lookup(rid, tokens, model_name=MODEL, world_size=1, dtype="bfloat16")
            deadline = time.monotonic() + 30
            while hit is None and time.monotonic() < deadline:
                time.sleep(0.005)
                hit = host.client.query_lookup(rid)
            hit = hit or 0
            wrong = 0
            if hit:
                nb = hit // BLOCK
                dst = host.engine.blocks[:, :, 64 : 64 + nb]
                dst[...] = 0
                host.client.retrieve(
                    rid, host.iid, tokens, start=0, end=hit, block_ids=range(64, 64 + nb)
                )
                wrong = int(np.count_nonzero(dst != original[:, :, :nb]))
            host.client.end_session(rid)
            return Read(t, stored_t, hit == len(tokens), hit, wrong, None)
        except Exception as exc:
            return Read(t, stored_t, False, 0, 0, f"{type(exc).__name__}: {exc}")

    def _watch(self) -> None:
        while not self._stop.wait(0.2):
            for host in self.hosts:
                try:
                    with urllib.request.urlopen(host.server.url + "/healthcheck", timeout=5) as r:
                        code, degraded = r.status, b"degraded" in r.read()
                except urllib.error.HTTPError as exc:
                    code, degraded = exc.code, False
                except OSError:
                    code, degraded = 0, False
                self.health.append((time.monotonic(), code, degraded))


@dataclass
class Figures:
    """What one event did, from its start to the next event's (or the end)."""

    event: str
    action_s: float
    reads: int
    full_hits: int
    misses: int
    errors: int
    wrong_bytes: int
    l2_errors: int
    resume_s: float | None
    unhealthy_polls: int
    degraded_polls: int

    @classmethod
    def of(cls, load: Load, end: float, end_errors: int) -> list[Figures]:
        out = []
        bounds = [e.t for e in load.events[1:]] + [end]
        errors = [e.l2_errors for e in load.events[1:]] + [end_errors]
        for e, stop, err in zip(load.events, bounds, errors, strict=True):
            rs = [r for r in load.reads if e.t <= r.t < stop]
            hs = [(c, d) for t, c, d in load.health if e.t <= t < stop]
            resumed = [r.t - e.t for r in rs if r.stored_t >= e.t and r.full]
            out.append(cls(
                e.name, round(e.took_s, 2), len(rs), sum(r.full for r in rs),
                sum(not r.full and r.error is None for r in rs),
                sum(r.error is not None for r in rs), sum(r.wrong_bytes for r in rs),
                err - e.l2_errors, round(resumed[0], 2) if resumed else None,
                sum(c != 200 for c, _ in hs), sum(d for _, d in hs),
            ))  # fmt: skip
        return out

    def line(self) -> str:
        resume = "never" if self.resume_s is None else f"{self.resume_s:.2f}s"
        return (
            f"{self.event:<28} action {self.action_s:5.2f}s  reads {self.reads:5d}  "
            f"hits {self.full_hits:5d}  misses {self.misses:4d}  errors {self.errors:3d}  "
            f"wrong bytes {self.wrong_bytes}  L2 errors {self.l2_errors:3d}  "
            f"hits resume {resume:>7}  unhealthy {self.unhealthy_polls}  "
            f"degraded polls {self.degraded_polls}"
        )


def rss_mib(pid: int) -> float:
    """Resident memory of a process (Linux /proc), MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def l2_status(server: ServerProcess) -> dict[str, Any]:
    """The server's first L2 adapter in /status."""
    adapters: list[dict[str, Any]] = server.status()["l2_adapters"]
    return adapters[0]


@dataclass
class Outcome:
    figures: list[Figures]
    drained: bool  # every server's write-behind queue emptied after the last event
    rss_mib: list[tuple[float, float]]  # per server: after warm-up, at the end
    stores: int
    store_errors: int
    last_errors: list[str | None]  # each server's last L2 error (credentials never shown)

    def report(self) -> str:
        lines = [f.line() for f in self.figures]
        lines.append(f"stores {self.stores} (errors {self.store_errors}); write-behind queues "
                     f"drained: {self.drained}; server RSS MiB (warm -> end): "
                     + ", ".join(f"{a:.0f} -> {b:.0f}" for a, b in self.rss_mib))  # fmt: skip
        lines += [f"server {i} last L2 error: {e}" for i, e in enumerate(self.last_errors)]
        return "\n".join(lines)


def failover_scenario(
    cluster: RedisCluster, load: Load, *, steady_s: float = 2.0, resume_s: float = 20.0,
    reshard_slots: int = 1000, victim: int | None = None,
) -> Outcome:  # fmt: skip
    """Under ``load`` (started): steady traffic, SIGKILL a master (until its replica took
    over), reshard ``reshard_slots`` slots between two live masters while traffic runs,
    restart the dead node (it rejoins as a replica); after each, wait until hits resume
    (at most ``resume_s``) and ``steady_s`` more. ``victim``: the master to kill (default:
    the first). Stops ``load``."""
    servers = [h.server for h in load.hosts]

    def settle(event: Event) -> None:
        load.wait_resumed(event, resume_s + event.took_s)
        time.sleep(steady_s)

    try:
        settle(load.event("steady"))
        rss = [rss_mib(s.proc.pid) for s in servers]
        victim = victim or cluster.masters()[0]
        e = load.event(f"SIGKILL master :{victim}")
        cluster.kill(victim)
        e.took_s = cluster.wait_failover(victim, timeout=60)
        settle(e)
        source, target = cluster.masters()[:2]
        e = load.event(f"reshard {reshard_slots} slots")
        t0 = time.monotonic()
        cluster.reshard(source, target, reshard_slots)
        e.took_s = time.monotonic() - t0
        settle(e)
        e = load.event(f"restart :{victim}")
        cluster.restart(victim)
        e.took_s = cluster.wait_rejoined(victim, 60)
        settle(e)
    finally:
        load.stop()
    end = time.monotonic()
    deadline, drained = end + 30, False
    while not drained and time.monotonic() < deadline:
        drained = not any(l2_status(s)["queue_depth"] for s in servers)
        time.sleep(0.1)
    return Outcome(
        Figures.of(load, end, load.l2_errors()), drained,
        [(a, rss_mib(s.proc.pid)) for a, s in zip(rss, servers, strict=True)],
        load.stores, load.store_errors, load.last_errors(),
    )  # fmt: skip
