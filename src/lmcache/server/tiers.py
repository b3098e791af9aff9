"""L2 tiers behind L1: write-behind copies and prefetch on lookup.

    store ─> L1 commit ─> queue (bounded; full = skip and count) ─> writer thread ─> every L2
    lookup ─> L1 prefix ─> rest: one batched `exists` per adapter ─> prefetch job:
              L2 ─get_into─> new L1 object ─commit─> pinned into the lookup's lease
              the lookup answers "pending" until the job is done, then the full hit

L2 keys also encode the chunk layout (`l2_key`), so an engine never loads bytes
written by an engine with another layout, even one of the same byte size.
Evicting from L1 leaves L2 alone; a dead adapter means misses, never a crash.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from lmcache.defaults import L2_BREAKER_S, L2_PREFETCH_WORKERS, L2_QUEUE_SIZE
from lmcache.server.sessions import Session, Sessions
from lmcache.storage.l1 import L1Cache, WriteSlot
from lmcache.storage.l2.base import L2Adapter, L2Error
from lmcache.types import ObjectKey

logger = logging.getLogger("lmcache.server")


def l2_key(key: ObjectKey, tag: bytes) -> ObjectKey:
    """The L2 name of an L1 object: its key with the layout folded into the namespace part."""
    return ObjectKey(hashlib.sha256(key[:16] + tag).digest()[:16] + key[16:])


@dataclass(frozen=True)
class RankLayout:
    """What the L1 object of one rank's chunk looks like (from a registered engine)."""

    tag: bytes
    nbytes: int


@dataclass
class _Counters:
    """Updated by the request threads, the writer and the prefetch workers at once: ``+=``
    on an attribute is a read and a write, so two threads can lose an update. `add` and
    `snapshot` take a lock (held for a few additions, never for I/O)."""

    queued: int = 0
    skipped_full: int = 0
    stored: int = 0
    store_bytes: int = 0
    store_seconds: float = 0.0
    prefetched: int = 0
    prefetch_bytes: int = 0
    prefetch_seconds: float = 0.0
    prefetch_failures: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def add(self, **deltas: float) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)

    def snapshot(self) -> _Counters:
        """A consistent copy (its own lock), for /status."""
        with self._lock:
            return replace(self)


class TieredStore:
    def __init__(
        self,
        l1: L1Cache,
        sessions: Sessions,
        adapters: Sequence[L2Adapter],
        *,
        queue_size: int = L2_QUEUE_SIZE,
        prefetch_workers: int = L2_PREFETCH_WORKERS,
        breaker_s: float = L2_BREAKER_S,
    ) -> None:
        self.l1 = l1
        self.sessions = sessions
        self.adapters = list(adapters)
        self.queue_size = queue_size  # --l2-queue-size
        self.prefetch_workers = prefetch_workers  # --l2-prefetch-workers
        self.breaker_s = breaker_s  # --l2-breaker-s
        self._queue: queue.Queue[tuple[ObjectKey, bytes] | None] = queue.Queue(queue_size)
        self._prefetch = ThreadPoolExecutor(
            prefetch_workers, thread_name_prefix="lmcache-l2-prefetch"
        )
        self._writer = threading.Thread(
            target=self._write_loop, name="lmcache-l2-writer", daemon=True
        )
        self.counters = _Counters()
        self.writer_error: str | None = None
        self._down_until: dict[str, float] = {}

    def start(self) -> None:
        self._writer.start()

    def stop(self) -> None:
        """Stop taking work; pending copies to L2 are dropped (L2 is a cache)."""
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._queue.put(None)
        self._writer.join(timeout=10)
        self._prefetch.shutdown(wait=True, cancel_futures=True)
        for adapter in self.adapters:
            adapter.close()

    @property
    def writer_alive(self) -> bool:
        return self._writer.is_alive()

    # ----- write path ----------------------------------------------------------------------

    def stored(self, key: ObjectKey, tag: bytes) -> None:
        """A chunk landed in L1: copy it to every L2 in the background (never blocks)."""
        try:
            self._queue.put_nowait((key, tag))
            self.counters.add(queued=1)
        except queue.Full:
            self.counters.add(skipped_full=1)

    def _write_loop(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                self._write(*item)
            except Exception as exc:  # keep going: one bad object must not stop the writer
                self.writer_error = f"{type(exc).__name__}: {exc}"
                logger.exception("copying a chunk to L2 failed")

    def _write(self, key: ObjectKey, tag: bytes) -> None:
        lease = self.l1.acquire_all([key], owner="l2-writer", tag=tag)
        if lease is None:
            return  # evicted or cleared before its turn
        try:
            ((offset, nbytes),) = lease.offsets([key])
            data = self.l1.view(offset, nbytes).data
            start = time.perf_counter()
            for adapter in self.adapters:
                if self._down_until.get(adapter.name, 0.0) > time.monotonic():
                    continue
                try:
                    adapter.put(l2_key(key, tag), data)
                except L2Error as exc:
                    self._trip(adapter, exc)
                    continue
                self.counters.add(stored=1, store_bytes=nbytes)
            self.counters.add(store_seconds=time.perf_counter() - start)
        finally:
            self.l1.release(lease)

    # ----- read path -----------------------------------------------------------------------

    def prefetch(
        self,
        session: Session,
        groups: list[list[ObjectKey]],
        layouts: list[RankLayout],
        done: Callable[[Session], None],
    ) -> None:
        """Find the chunk ``groups`` (those after the L1 hit) in L2 and load the longest run
        into L1, in the background; the session is pending until then, then ``done``."""
        self._prefetch.submit(self._find_and_load, session, groups, layouts, done)

    def _find_and_load(
        self,
        session: Session,
        groups: list[list[ObjectKey]],
        layouts: list[RankLayout],
        done: Callable[[Session], None],
    ) -> None:
        try:
            sources = self._locate(groups, layouts)
        except Exception:
            logger.exception("L2 lookup failed")
            sources = []
        run = 0
        while run < len(sources) and all(s is not None for s in sources[run]):
            run += 1
        self._load(session, groups[:run], layouts, sources[:run])
        done(session)

    def _locate(
        self, groups: list[list[ObjectKey]], layouts: list[RankLayout]
    ) -> list[list[L2Adapter | None]]:
        """For every key, the first adapter that has it (one `exists` call per adapter)."""
        found: list[list[L2Adapter | None]] = [[None] * len(g) for g in groups]
        for adapter in self.adapters:
            todo = [(i, r) for i, g in enumerate(found) for r, a in enumerate(g) if a is None]
            if not todo:
                break
            if self._down_until.get(adapter.name, 0.0) > time.monotonic():
                continue  # failed recently: do not make every lookup wait for its timeout
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
        session: Session,
        groups: list[list[ObjectKey]],
        layouts: list[RankLayout],
        sources: list[list[L2Adapter | None]],
    ) -> None:
        loaded: list[list[ObjectKey]] = []
        start = time.perf_counter()
        try:
            for group, where in zip(groups, sources, strict=True):
                if not all(
                    self._load_one(k, lay, a)
                    for k, lay, a in zip(group, layouts, where, strict=True)
                ):
                    break
                if self.l1.extend(session.lease, [group]) != 1:
                    break  # evicted again already, or the session ended
                loaded.append(group)
        except Exception:
            self.counters.add(prefetch_failures=1)
            logger.exception("L2 prefetch failed")
        finally:
            self.counters.add(prefetch_seconds=time.perf_counter() - start)
            self.sessions.finish(session, loaded)

    def _load_one(self, key: ObjectKey, layout: RankLayout, adapter: L2Adapter | None) -> bool:
        if adapter is None:
            return False
        slot = self.l1.reserve_write(key, layout.nbytes, tag=layout.tag)
        if slot == "cached":
            return True  # stored by an engine meanwhile
        if slot == "no_space" or slot == "conflict":  # noqa: PLR1714 (narrows the type)
            return False
        return self._fill(slot, layout, adapter)

    def _fill(self, slot: WriteSlot, layout: RankLayout, adapter: L2Adapter) -> bool:
        out = self.l1.view(slot.offset, slot.nbytes).data
        try:
            ok = adapter.get_into(l2_key(slot.key, layout.tag), out)
        except L2Error as exc:
            self._trip(adapter, exc)
            ok = False
        if not ok:
            self.l1.abort_write(slot)
            self.counters.add(prefetch_failures=1)
            return False
        if not self.l1.commit_write(slot):
            return False
        self.counters.add(prefetched=1, prefetch_bytes=slot.nbytes)
        return True

    def _trip(self, adapter: L2Adapter, exc: Exception) -> None:
        """Skip an adapter's lookups for a few seconds after a failure (it may be down)."""
        if self._down_until.get(adapter.name, 0.0) <= time.monotonic():
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
            "queue_depth": self._queue.qsize(),
            "queue_skipped_full": c.skipped_full,
            "stored_objects": c.stored,
            "store_gbps": _gbps(c.store_bytes, c.store_seconds),
            "prefetch_gbps": _gbps(c.prefetch_bytes, c.prefetch_seconds),
            "prefetched_objects": c.prefetched,
            "prefetch_failures": c.prefetch_failures,
        }
        return [{**_safe_stats(a), **shared} for a in self.adapters]

    def problems(self) -> list[str]:
        out = [
            f"L2 {s['name']} is down: {s.get('last_error')}"
            for s in self.status()
            if not s.get("healthy", True)
        ]
        if not self.writer_alive and self.adapters:
            out.append("L2 writer thread is dead")
        return out


def _safe_stats(adapter: L2Adapter) -> dict[str, Any]:
    try:
        return adapter.stats()
    except Exception as exc:  # stats must never take /status down
        return {"name": adapter.name, "healthy": False, "last_error": str(exc)}


def _gbps(nbytes: int, seconds: float) -> float | None:
    return round(nbytes / seconds / 1e9, 3) if seconds > 0 else None
