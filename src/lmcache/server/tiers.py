"""L2 tiers behind L1: write-behind copies and prefetch on lookup.

    store ─> L1 commit ─> WriteBehind (bounded; full = skip and count) ─> writer ─> every L2
    lookup ─> L1 prefix ─> rest: one batched `exists` per adapter ─> prefetch job:
              L2 ─get_into─> new L1 object ─commit─> pinned into the lookup's lease
              the lookup answers "pending"; its session polls the job's handle (a Future)
              and answers the full hit once it is done

L2 keys also encode the chunk layout (`lmcache.storage.keyspace.l2_key`), so an engine
never loads bytes written by an engine with another layout, even one of the same size.
Evicting from L1 leaves L2 alone; a dead adapter means misses, never a crash. All L1
access goes through the `ChunkStore`, whose ``on_stored`` hook is `WriteBehind.offer`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from lmcache.defaults import L2_BREAKER_S, L2_PREFETCH_WORKERS, L2_WRITERS
from lmcache.server.metrics import Metrics
from lmcache.server.write_behind import WriteBehind
from lmcache.storage.chunk_store import ChunkLayout, ChunkStore
from lmcache.storage.keyspace import l2_key
from lmcache.storage.l1 import Lease
from lmcache.storage.l2.base import L2Adapter, L2Error
from lmcache.storage.l2.policies import Fastest, InOrder, PrefetchPolicy, StorePolicy, WriteAll
from lmcache.types import ObjectKey

logger = logging.getLogger("lmcache.server")


@dataclass
class _Counters:
    """Updated by the request threads, the writers and the prefetch workers at once: ``+=``
    on an attribute is a read and a write, so two threads can lose an update. `add` and
    `snapshot` take a lock (held for a few additions, never for I/O).

    ``store_seconds`` is wall time during which at least one writer was copying (see
    `writing`), not the sum of every writer's seconds: with several writers the sum
    grows with their number and store_gbps would drop as copies overlap."""

    stored: int = 0
    store_bytes: int = 0
    store_seconds: float = 0.0
    prefetched: int = 0
    prefetch_bytes: int = 0
    prefetch_seconds: float = 0.0
    prefetch_failures: int = 0
    _writing: int = field(default=0, init=False, repr=False)  # writers copying now
    _busy_since: float = field(default=0.0, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def add(self, **deltas: float) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Around one writer's copy: the first writer in starts the busy clock, the last
        one out adds the busy stretch to ``store_seconds``."""
        with self._lock:
            if self._writing == 0:
                self._busy_since = time.perf_counter()
            self._writing += 1
        try:
            yield
        finally:
            with self._lock:
                self._writing -= 1
                if self._writing == 0:
                    self.store_seconds += time.perf_counter() - self._busy_since

    def snapshot(self) -> _Counters:
        """A consistent copy (its own lock), for /status; a busy stretch still running
        counts up to now, so store_gbps matches the bytes already counted."""
        with self._lock:
            copy = replace(self)
            if self._writing:
                copy.store_seconds += time.perf_counter() - self._busy_since
            return copy


class TieredStore:
    def __init__(
        self,
        store: ChunkStore,
        adapters: Sequence[L2Adapter],
        write_behind: WriteBehind,
        *,
        prefetch_workers: int = L2_PREFETCH_WORKERS,
        writers: int = L2_WRITERS,
        breaker_s: float = L2_BREAKER_S,
        store_policy: StorePolicy | None = None,
        prefetch_policy: PrefetchPolicy | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self.adapters = list(adapters)
        self.metrics = metrics or Metrics(dict, names="none")
        # Upstream's labels for an adapter's series: its type and its place in the list.
        self.labels = {
            a.name: (str(_safe_stats(a).get("type", a.name)), str(i))
            for i, a in enumerate(self.adapters)
        }
        self.write_behind = write_behind
        self.prefetch_workers = prefetch_workers  # --l2-prefetch-workers
        self.breaker_s = breaker_s  # --l2-breaker-s
        self.store_policy: StorePolicy = store_policy or WriteAll()  # --l2-store-policy
        self.prefetch_policy: PrefetchPolicy = prefetch_policy or InOrder()  # --l2-prefetch-policy
        self._prefetch = ThreadPoolExecutor(
            prefetch_workers, thread_name_prefix="lmcache-l2-prefetch"
        )
        # Several writers: one connection each (redis-py's pool hands every thread its
        # own), so the next chunk goes out while Redis still reads the last one. A chunk
        # is taken by one writer; a key offered twice is the same bytes twice (keys are
        # content digests plus the layout), so overlapping copies of it are harmless.
        self.writers = writers  # --l2-writers
        self._writers = [
            threading.Thread(target=self._write_loop, name=f"lmcache-l2-writer-{i}", daemon=True)
            for i in range(writers)
        ]
        self.counters = _Counters()
        self.writer_error: str | None = None
        self._down_until: dict[str, float] = {}

    def start(self) -> None:
        for writer in self._writers:
            writer.start()

    def stop(self) -> None:
        """Stop taking work; pending copies to L2 are dropped (L2 is a cache)."""
        self.write_behind.close()
        deadline = time.monotonic() + 10
        for writer in self._writers:
            if writer.ident is not None:  # started
                writer.join(timeout=max(0.0, deadline - time.monotonic()))
        self._prefetch.shutdown(wait=True, cancel_futures=True)
        for adapter in self.adapters:
            adapter.close()

    @property
    def writer_alive(self) -> bool:
        """Every writer thread runs."""
        return all(w.is_alive() for w in self._writers)

    # ----- write path ----------------------------------------------------------------------

    def _write_loop(self) -> None:
        while (item := self.write_behind.take()) is not None:
            try:
                self._write(*item)
            except Exception as exc:  # keep going: one bad object must not stop the writer
                self.writer_error = f"{type(exc).__name__}: {exc}"
                logger.exception("copying a chunk to L2 failed")

    def _write(self, key: ObjectKey, tag: bytes) -> None:
        lease = self.store.pin([key], tag, owner="l2-writer")
        if lease is None:
            return  # evicted or cleared before its turn
        try:
            ((offset, nbytes),) = lease.offsets([key])
            data = self.store.view(offset, nbytes).data
            with self.counters.writing():
                self._write_tiers(l2_key(key, tag), data, nbytes)
        finally:
            self.store.unpin(lease)

    def _write_tiers(self, name: ObjectKey, data: memoryview, nbytes: int) -> None:
        tried: set[str] = set()
        # Ask the policy again after a failure: the failed tier is down now, so a
        # fallback chain (`WriteFirst`) moves on to the next one for this very chunk.
        while todo := [
            a for a in self.store_policy.targets(self.adapters, self._up)
            if a.name not in tried
        ]:  # fmt: skip
            for adapter in todo:
                tried.add(adapter.name)
                kind, index = self.labels[adapter.name]
                self.metrics.count("l2_store_started", (kind, index))
                start = time.perf_counter()
                try:
                    adapter.put(name, data)
                except L2Error as exc:
                    self._trip(adapter, exc)
                    continue
                finally:
                    self.metrics.count("l2_store_ended", (kind, index))
                self.counters.add(stored=1, store_bytes=nbytes)
                self.metrics.count("l2_store_completed", (kind,))
                self._observe_gbps("l2_store", kind, nbytes, time.perf_counter() - start)

    # ----- read path -----------------------------------------------------------------------

    def prefetch(
        self, lease: Lease, groups: list[list[ObjectKey]], layouts: list[ChunkLayout],
        salt: str = "",
    ) -> Future[list[list[ObjectKey]]]:  # fmt: skip
        """Find the chunk ``groups`` (those after the L1 hit) in L2 and load the longest run
        into L1, pinned into ``lease``, in the background, as chunks of ``salt`` (the
        lookup's cache_salt). The handle's result is the groups loaded (possibly none); the
        lookup's session polls it (`Sessions.poll`)."""
        self.metrics.count("prefetch_jobs_started")
        return self._prefetch.submit(self._find_and_load, lease, groups, layouts, salt)

    def _find_and_load(
        self, lease: Lease, groups: list[list[ObjectKey]], layouts: list[ChunkLayout],
        salt: str = "",
    ) -> list[list[ObjectKey]]:  # fmt: skip
        try:
            self.metrics.count("l2_prefetch_lookup")
            self.metrics.count("l2_prefetch_lookup_objects", (), sum(len(g) for g in groups))
            try:
                sources = self._locate(groups, layouts)
            except Exception:
                logger.exception("L2 lookup failed")
                sources = []
            run = 0
            while run < len(sources) and all(s is not None for s in sources[run]):
                run += 1
            if run:  # upstream counts one load task per adapter that has chunks to give
                used = {a.name for where in sources[:run] for a in where if a is not None}
                self.metrics.count("l2_prefetch_load_submitted", (), len(used))
                self.metrics.count(
                    "l2_prefetch_load_submitted_objects", (), sum(len(g) for g in groups[:run])
                )
            return self._load(lease, groups[:run], layouts, sources[:run], salt)
        finally:
            self.metrics.count("prefetch_jobs_ended")

    def _locate(
        self, groups: list[list[ObjectKey]], layouts: list[ChunkLayout]
    ) -> list[list[L2Adapter | None]]:
        """For every key, the first adapter in the prefetch policy's order that has it (one
        `exists` call per adapter). Adapters that failed recently are not asked: a lookup
        must not wait for their timeout."""
        found: list[list[L2Adapter | None]] = [[None] * len(g) for g in groups]
        for adapter in self.prefetch_policy.order(self.adapters, self._up):
            todo = [(i, r) for i, g in enumerate(found) for r, a in enumerate(g) if a is None]
            if not todo:
                break
            keys = [l2_key(groups[i][r], layouts[r].tag) for i, r in todo]
            try:
                present = adapter.exists(keys)
            except L2Error as exc:
                self._trip(adapter, exc)
                continue
            for (i, r), hit in zip(todo, present, strict=True):
                if hit:
                    found[i][r] = adapter
        return found

    def _load(
        self,
        lease: Lease,
        groups: list[list[ObjectKey]],
        layouts: list[ChunkLayout],
        sources: list[list[L2Adapter | None]],
        salt: str,
    ) -> list[list[ObjectKey]]:
        loaded: list[list[ObjectKey]] = []
        start = time.perf_counter()
        try:
            for group, where in zip(groups, sources, strict=True):
                if not all(
                    self._load_one(k, lay, a, salt)
                    for k, lay, a in zip(group, layouts, where, strict=True)
                ):
                    break
                if self.store.extend(lease, [group]) != 1:
                    break  # evicted again already, or the session ended
                loaded.append(group)
        except Exception:
            self.counters.add(prefetch_failures=1)
            logger.exception("L2 prefetch failed")
        finally:
            self.counters.add(prefetch_seconds=time.perf_counter() - start)
        return loaded

    def _load_one(
        self, key: ObjectKey, layout: ChunkLayout, adapter: L2Adapter | None, salt: str
    ) -> bool:
        if adapter is None:
            return False

        kind, index = self.labels[adapter.name]

        def fill(_: int, out: np.ndarray) -> bool:
            self.metrics.count("l2_load_started", (kind, index))
            self.metrics.count("l2_load_bytes_started", (kind, index), out.nbytes)
            start = time.perf_counter()
            try:
                ok = adapter.get_into(l2_key(key, layout.tag), out.data)
            except L2Error as exc:
                self._trip(adapter, exc)
                ok = False
            finally:
                self.metrics.count("l2_load_ended", (kind, index))
                self.metrics.count("l2_load_bytes_ended", (kind, index), out.nbytes)
            seconds = time.perf_counter() - start
            if ok:
                self.prefetch_policy.observe(adapter, out.nbytes, seconds)
                self.metrics.count("l2_load_completed", (kind,))
                self._observe_gbps("l2_load", kind, out.nbytes, seconds)
            else:
                self.counters.add(prefetch_failures=1)
                self.metrics.count("l2_prefetch_failure", ("not_found",))
            return ok

        # Not told to the write-behind hook: these bytes came from L2.
        result = self.store.write([key], layout, fill, notify=False, salt=salt)
        if result.stored:
            self.counters.add(prefetched=1, prefetch_bytes=layout.nbytes)
            self.metrics.count("l2_prefetch_load_completed")
            self.metrics.count("l1_write")  # upstream counts L1 writes from L2 too
        elif result.no_space:
            self.metrics.count("l2_prefetch_failure", ("l1_oom",))
        return bool(result.stored or result.cached)  # cached: stored by an engine meanwhile

    def _observe_gbps(self, name: str, kind: str, nbytes: int, seconds: float) -> None:
        if seconds > 0:
            self.metrics.observe_gbps(name, (kind,), nbytes / seconds / 1e9)

    def _up(self, adapter: L2Adapter) -> bool:
        """Not skipped after a recent failure (see `_trip`)."""
        return self._down_until.get(adapter.name, 0.0) <= time.monotonic()

    def _trip(self, adapter: L2Adapter, exc: Exception) -> None:
        """Skip an adapter's lookups for a few seconds after a failure (it may be down)."""
        if self._up(adapter):  # log when it goes down, not on every failure while down
            logger.warning(
                "L2 %s failed (%s): lookups skip it for %gs", adapter.name, exc, self.breaker_s
            )
        self._down_until[adapter.name] = time.monotonic() + self.breaker_s

    # ----- views ---------------------------------------------------------------------------

    def clear(self) -> int:
        removed = 0
        for adapter in self.adapters:
            try:
                removed += adapter.clear()
            except L2Error as exc:
                logger.warning("L2 %s: clear failed: %s", adapter.name, exc)
        return removed

    def status(self) -> list[dict[str, Any]]:
        c = self.counters.snapshot()
        shared = {
            "store_policy": self.store_policy.name,
            "prefetch_policy": self.prefetch_policy.name,
            "queue_depth": len(self.write_behind),
            "queue_skipped_full": self.write_behind.skipped_full,
            "queue_accepted": self.write_behind.accepted,
            "stored_objects": c.stored,
            "store_gbps": _gbps(c.store_bytes, c.store_seconds),
            "prefetch_gbps": _gbps(c.prefetch_bytes, c.prefetch_seconds),
            "prefetched_objects": c.prefetched,
            "prefetch_failures": c.prefetch_failures,
        }
        # What `Fastest` ranks by, so an operator can see why reads go where they go.
        policy = self.prefetch_policy
        speeds = policy.speeds() if isinstance(policy, Fastest) else None
        return [
            {**_safe_stats(a), **shared}
            | ({"read_gbps": speeds.get(a.name)} if speeds is not None else {})
            for a in self.adapters
        ]

    def problems(self) -> list[str]:
        out = [
            f"L2 {s['name']} is down: {s.get('last_error')}"
            for s in self.status()
            if not s.get("healthy", True)
        ]
        if not self.writer_alive and self.adapters:
            out.append("an L2 writer thread is dead")
        return out


def _safe_stats(adapter: L2Adapter) -> dict[str, Any]:
    try:
        return adapter.stats()
    except Exception as exc:  # stats must never take /status down
        return {"name": adapter.name, "healthy": False, "last_error": str(exc)}


def _gbps(nbytes: int, seconds: float) -> float | None:
    return round(nbytes / seconds / 1e9, 3) if seconds > 0 else None
