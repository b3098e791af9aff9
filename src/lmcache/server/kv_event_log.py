"""The server's KV event log (``--kv-event-log-size N``): what entered and left L1, polled.

A KV-aware router needs to know when chunks *leave* the cache too, including evictions
that no engine caused. Engines (and any client of the server's uid) poll this log with
`PollKVEvents`; the vLLM connector turns the removals of chunks it stored into vLLM
``BlockRemoved`` events (`lmcache.integration.vllm.kv_events`).

    ChunkStore commit ──stored(key)──> KVEventLog: ring of N records (seq, kind, key)
    maintenance tick  ──sweep()──────>   removed(key) for tracked keys no longer in L1
    PollKVEvents{after, limit} <───────  records after `after`, `next`, `lost`

Removals are found by a sweep, not told by L1: every maintenance tick checks up to
`SWEEP_KEYS` of the keys the log saw stored (round robin) and logs those that left L1
(evicted, cleared, deleted, expired), whatever the cause, without a hook inside L1's
eviction. The price: a removal shows up within ``tracked / SWEEP_KEYS`` ticks, and a key
evicted and stored again between two checks shows only its stores (the final state is
right). Tracked keys are bounded by the log size (the oldest are forgotten: their
removal is then never logged).

Bounded everywhere: N records (`lost` tells a poller it missed some), N tracked keys, and
a poll returns at most `MAX_KV_EVENTS`. Size 0 (the default) builds nothing: no cost.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from itertools import islice

from lmcache.protocol.messages import KVEventRecord, KVEvents, PollKVEvents
from lmcache.types import ObjectKey

SWEEP_KEYS = 4096  # tracked keys checked per maintenance tick


class KVEventLog:
    def __init__(self, size: int, contains: Callable[[ObjectKey], bool], log_id: str) -> None:
        """``contains``: whether L1 holds a key readable now (``L1Cache.contains``);
        ``log_id``: this log's name in every answer (the server's per-start token)."""
        if size <= 0:
            raise ValueError("a KV event log needs a size of at least 1")
        self.size = size
        self.log_id = log_id
        self._contains = contains
        self._records: deque[KVEventRecord] = deque(maxlen=size)
        self._tracked: OrderedDict[ObjectKey, None] = OrderedDict()
        self._next = 1  # the sequence number of the next record
        self._lock = threading.Lock()

    # ----- what changed ---------------------------------------------------------------

    def stored(self, key: ObjectKey) -> None:
        """``key`` became readable in L1 (the store's commit hook)."""
        with self._lock:
            self._append("stored", key)
            self._tracked[key] = None
            self._tracked.move_to_end(key)
            while len(self._tracked) > self.size:
                self._tracked.popitem(last=False)

    def sweep(self, budget: int = SWEEP_KEYS) -> int:
        """Log the removal of up to ``budget`` checked keys that left L1; returns how many
        were removed. The checks run outside the log's lock (each takes L1's)."""
        with self._lock:
            batch = []
            for _ in range(min(budget, len(self._tracked))):
                key, _ = self._tracked.popitem(last=False)
                self._tracked[key] = None  # to the back: round robin
                batch.append(key)
        gone = [key for key in batch if not self._contains(key)]
        with self._lock:
            for key in gone:
                if key in self._tracked and not self._contains(key):
                    del self._tracked[key]
                    self._append("removed", key)
        return len(gone)

    def _append(self, kind: str, key: ObjectKey) -> None:
        self._records.append(KVEventRecord(self._next, kind, bytes(key)))
        self._next += 1

    # ----- polls ------------------------------------------------------------------------

    def poll(self, req: PollKVEvents) -> KVEvents:
        """Records after ``req.after``, at most ``req.limit``; ``lost`` when some after it
        are gone (the ring wrapped) or ``after`` lies ahead of this log (another log's)."""
        with self._lock:
            oldest = self._records[0].seq if self._records else self._next
            lost = req.after >= self._next or (req.after + 1 < oldest and req.after > 0)
            after = 0 if req.after >= self._next else req.after
            skip = max(0, after + 1 - oldest)
            records = list(islice(self._records, skip, skip + req.limit))
            nxt = records[-1].seq if records else max(after, oldest - 1)
        return KVEvents(
            id=req.id, log=self.log_id, enabled=True, next=nxt, lost=lost, records=records
        )

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "size": self.size,
                "records": len(self._records),
                "tracked_keys": len(self._tracked),
                "next_seq": self._next,
            }


def disabled(req: PollKVEvents, log_id: str) -> KVEvents:
    """The answer of a server started without ``--kv-event-log-size``."""
    return KVEvents(id=req.id, log=log_id, enabled=False, next=0)
