"""Prepared transfers: the engine's worker copies chunks into/out of L1 itself.

This is the ``lmcache_driven`` mode: the server never maps the engine's memory;
it hands out byte offsets in its own shared-memory pool::

    worker                                   server
      PrepareStore(range) ───────────────>   reserve slots (TTL)  ─> Prepared{id, offsets}
      gather blocks into pool[offsets]
      Commit(id) ────────────────────────>   slots become READY   ─> Committed{tokens}

      PrepareRetrieve(range) ────────────>   pin chunks (TTL)     ─> Prepared{id, offsets}
      scatter pool[offsets] into blocks
      Commit(id) ────────────────────────>   unpin; fails if cleared or expired meanwhile

A worker that dies mid-transfer loses its slots when their TTL passes; a commit
that arrives later fails, so its data is never trusted. The pages of an expired store
stay reserved while its worker's process lives (up to LATE_GRACE_TTLS more TTLs): a worker
that was only stalled (swapped out, SIGSTOP, a frozen cgroup) may still be copying into
them, and must never write into pages that another object got meanwhile. Its late commit,
or its death, frees them earlier.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from dataclasses import dataclass

from lmcache.errors import BadRequestError, CacheMissError, TransferError
from lmcache.protocol.messages import Commit, Committed, Prepared, PrepareRetrieve, PrepareStore
from lmcache.server.copies import record_retrieve, record_store
from lmcache.server.metrics import Metrics
from lmcache.server.registry import Engine, pid_alive
from lmcache.server.sessions import Sessions
from lmcache.storage.chunk_store import ChunkStore, WriteResult
from lmcache.storage.l1 import Lease, WriteSlot
from lmcache.types import ObjectKey

logger = logging.getLogger("lmcache.server")

MAX_PENDING = 4096  # prepared transfers awaiting a commit, all engines together
# An expired store's pages stay reserved for this many more TTLs while its writer's process
# lives (it may be stalled mid-copy); after that they are reclaimed, so that a live client
# that never commits cannot hold memory for ever. A writer stalled longer than 3 TTLs
# (15 min by default) in the middle of its copy is the remaining risk.
LATE_GRACE_TTLS = 2


@dataclass(eq=False)
class _Pending:
    kind: str
    instance_id: int
    request_id: str
    started: float
    expires: float
    chunk_bytes: int
    tag: bytes
    slots: list[WriteSlot]
    lease: Lease | None
    tokens: int
    pid: int | None = None  # the writer's process, if the kernel told us (see `expire`)
    tail_slot: WriteSlot | None = None  # a store's partial last chunk (L1 only)
    tail_tokens: int = 0
    model_name: str = ""  # for the metrics

    def abort(self, store: ChunkStore) -> None:
        store.abort(self.slots)
        if self.tail_slot is not None:
            store.abort([self.tail_slot])
        if self.lease is not None:
            store.unpin(self.lease)


class PreparedTransfers:
    def __init__(
        self, store: ChunkStore, sessions: Sessions, metrics: Metrics, chunk_size: int, ttl: float
    ) -> None:
        self._store = store
        self._sessions = sessions
        self._metrics = metrics
        self._chunk_size = chunk_size
        self._ttl = ttl
        self._pending: dict[int, _Pending] = {}
        self._lock = threading.Lock()

    def prepare_store(self, req: PrepareStore, keys: list[ObjectKey], engine: Engine) -> Prepared:
        tail = engine.tail_layout(req.end, self._chunk_size)
        res = self._store.reserve(
            keys, engine.chunk_layout, self._ttl, tail=tail, salt=req.cache_salt
        )
        if res.no_space:
            self._metrics.store_no_space.inc()
        pending = self._new("store", req, engine, slots=res.slots)
        pending.tail_slot, pending.tail_tokens = res.tail_slot, req.end % self._chunk_size
        tid = self._add(pending)
        return Prepared(
            id=req.id, transfer_id=tid, offsets=res.offsets, chunk_bytes=engine.chunk_bytes,
            ttl_s=self._ttl, no_space=res.no_space, keys=list(keys) if req.want_keys else [],
        )  # fmt: skip

    def prepare_retrieve(
        self, req: PrepareRetrieve, keys: list[ObjectKey], engine: Engine
    ) -> Prepared:
        tail = engine.tail_layout(req.end, self._chunk_size)
        lease = self._store.pin(
            keys, engine.layout_tag, owner=f"retrieve:{req.request_id}", ttl=self._ttl,
            tail_tag=None if tail is None else tail.tag,
        )  # fmt: skip
        if lease is None:
            raise CacheMissError(
                f"chunks for tokens [{req.start}, {req.end}) are not cached; recompute them"
            )
        self._sessions.release(req.request_id, keys)
        pending = self._new("retrieve", req, engine, lease=lease, tokens=req.end - req.start)
        tid = self._add(pending)
        return Prepared(
            id=req.id, transfer_id=tid, offsets=[o for o, _ in lease.offsets(keys)],
            chunk_bytes=engine.chunk_bytes, ttl_s=self._ttl,
        )  # fmt: skip

    def commit(self, req: Commit) -> Committed:
        with self._lock:
            pending = self._pending.get(req.transfer_id)
            if pending is not None and pending.instance_id == req.instance_id:
                del self._pending[req.transfer_id]
            else:
                pending = None  # another engine's transfer is not this caller's to finish
        if pending is None:
            raise BadRequestError(f"unknown or expired transfer {req.transfer_id}")
        if pending.expires < time.monotonic():
            pending.abort(self._store)  # frees the pages the late writer kept reserved
            raise TransferError(
                f"transfer {req.transfer_id} outlived its TTL ({self._ttl:g} s): not stored"
            )
        if pending.kind == "store":
            return self._commit_store(req, pending)
        assert pending.lease is not None
        intact = self._store.unpin(pending.lease)
        if not (req.success and intact):
            raise TransferError("the chunks were cleared or expired during the copy; recompute")
        nbytes = self._bytes(pending, pending.tokens)
        record_retrieve(
            self._metrics, pending.tokens, nbytes, pending.started, model=pending.model_name,
            chunks=-(-pending.tokens // self._chunk_size), finished=False,
        )  # fmt: skip
        return Committed(id=req.id, tokens=pending.tokens)

    def _commit_store(self, req: Commit, pending: _Pending) -> Committed:
        if not req.success:
            pending.abort(self._store)
            return Committed(id=req.id, tokens=0)
        result = WriteResult(stored=self._store.commit(pending.slots, pending.tag))
        tokens = result.stored * self._chunk_size
        if pending.tail_slot is not None and self._store.commit_tail(pending.tail_slot):
            result.stored += 1
            tokens += pending.tail_tokens
        chunks = len(pending.slots) + (pending.tail_slot is not None)
        record_store(
            self._metrics, result, chunks=chunks, tokens=tokens,
            nbytes=self._bytes(pending, tokens), started=pending.started,
            model=pending.model_name, finished=False,
        )  # fmt: skip
        return Committed(id=req.id, tokens=tokens)

    def _bytes(self, pending: _Pending, tokens: int) -> int:
        # Exact: ``tokens`` are whole blocks, and a chunk's bytes are its blocks' bytes.
        return tokens * pending.chunk_bytes // self._chunk_size

    def expire(self, now: float | None = None) -> int:
        """Forget transfers past their TTL: retrieves at once (the L1 unpins them itself),
        stores once their worker's process is gone or unknown (see the module docstring)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            stale = [(tid, p) for tid, p in self._pending.items() if p.expires < now]
        dropped = []
        for tid, pending in stale:
            if (
                pending.kind == "store"
                and now < pending.expires + LATE_GRACE_TTLS * self._ttl
                and pending.pid
                and pid_alive(pending.pid)
            ):
                continue  # stalled, maybe still writing: keep its pages a while longer
            dropped.append(tid)
        with self._lock:
            gone = [p for p in (self._pending.pop(tid, None) for tid in dropped) if p]
        for pending in gone:
            pending.abort(self._store)
        return len(gone)

    def drop_engine(self, instance_id: int) -> int:
        """Abandon the transfers of an engine whose process is gone: slots and pins are
        released now. (A silent but live engine's transfers wait for `expire`.)"""
        with self._lock:
            mine = [tid for tid, p in self._pending.items() if p.instance_id == instance_id]
            dropped = [self._pending.pop(tid) for tid in mine]
        for pending in dropped:
            pending.abort(self._store)
        return len(dropped)

    def __len__(self) -> int:
        return len(self._pending)

    def _add(self, pending: _Pending) -> int:
        with self._lock:
            full = len(self._pending) >= MAX_PENDING
            tid = secrets.randbits(63)  # unguessable: only its engine can finish it
            while tid in self._pending:
                tid = secrets.randbits(63)
            if not full:
                self._pending[tid] = pending
        if full:  # release outside our lock: that takes the L1's
            pending.abort(self._store)
            raise BadRequestError(
                f"too many prepared transfers ({MAX_PENDING}) waiting for their commit"
            )
        return tid

    def _new(
        self, kind: str, req: PrepareStore | PrepareRetrieve, engine: Engine, *,
        slots: list[WriteSlot] | None = None, lease: Lease | None = None, tokens: int = 0,
    ) -> _Pending:  # fmt: skip
        now = time.perf_counter(), time.monotonic() + self._ttl
        return _Pending(
            kind, req.instance_id, req.request_id, *now, engine.chunk_bytes, engine.layout_tag,
            slots or [], lease, tokens, engine.pid, model_name=engine.model_name,
        )  # fmt: skip
