"""Composition: the server's parts for one L1 pool, wired together, nothing started.

    settings, pool ─> L1Cache ─> ChunkStore ──(on_stored)──> WriteBehind ─> TieredStore
                                    │ └─(on_committed)─> KVEventLog            │
                                    │                                          │
                        Sessions <──┤        KeySpace (hasher, digests)        │
                                    └──────> RequestHandler <──────────────────┘

`build` allocates nothing and starts no thread, so it is cheap to call in a test with a
numpy array as the pool; `lmcache.server.runtime.ServerRuntime` allocates the shared pool,
calls it, then starts the L2 writer, the ZMQ server and the maintenance thread.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from lmcache.server.handlers import RequestHandler
from lmcache.server.kv_event_log import KVEventLog
from lmcache.server.metrics import Metrics
from lmcache.server.registry import EngineRegistry
from lmcache.server.sessions import Sessions
from lmcache.server.tiers import TieredStore
from lmcache.server.write_behind import WriteBehind
from lmcache.settings import ServerSettings
from lmcache.storage.chunk_store import ChunkStore
from lmcache.storage.eviction import make_policy
from lmcache.storage.keys import ChunkHasher
from lmcache.storage.keyspace import KeySpace
from lmcache.storage.l1 import L1Cache
from lmcache.storage.l2 import L2Adapter
from lmcache.storage.l2.policies import PREFETCH_POLICIES, STORE_POLICIES


@dataclass(frozen=True)
class Core:
    l1: L1Cache
    store: ChunkStore
    sessions: Sessions
    tiers: TieredStore | None  # None without L2 adapters
    handler: RequestHandler
    kv_events: KVEventLog | None = None  # None without --kv-event-log-size


def build(
    settings: ServerSettings, pool: np.ndarray, *, registry: EngineRegistry, metrics: Metrics,
    adapters: Sequence[L2Adapter] = (), server_token: str = "", pool_name: str = "",
    pool_seal: str = "", local_endpoint: str = "", pool_committed: int | None = None,
    grow_pool: Callable[[int], int] | None = None,
) -> Core:  # fmt: skip
    """Wire the parts over ``pool`` (the L1 bytes) as ``settings`` say; a lazy pool has
    only ``pool_committed`` bytes backed and grows with ``grow_pool`` (`PoolMemory`)."""
    s = settings
    policy = make_policy(s.eviction_policy, default_limit=s.default_quota_bytes)
    l1 = L1Cache(pool, policy, committed_bytes=pool_committed, grow=grow_pool)
    # L2's write-behind queue is the store's one hook: every chunk that becomes READY from
    # an engine (not from L2) is offered to it.
    write_behind = WriteBehind(s.l2_queue_size) if adapters else None
    events = (
        KVEventLog(s.kv_event_log_size, l1.contains, server_token) if s.kv_event_log_size else None
    )
    store = ChunkStore(
        l1, on_stored=write_behind.offer if write_behind is not None else None,
        on_committed=events.stored if events is not None else None,
    )  # fmt: skip
    sessions = Sessions(store, s.chunk_size, s.lock_ttl_s)
    tiers = None
    if write_behind is not None:
        tiers = TieredStore(
            store, adapters, write_behind,
            prefetch_workers=s.l2_prefetch_workers, writers=s.l2_writers,
            breaker_s=s.l2_breaker_s,
            store_policy=STORE_POLICIES[s.l2_store_policy](),
            prefetch_policy=PREFETCH_POLICIES[s.l2_prefetch_policy](),
            metrics=metrics,
        )  # fmt: skip
    handler = RequestHandler(
        store=store,
        keys=KeySpace(ChunkHasher(s.chunk_size, s.hash_algorithm, s.hash_memo_bytes)),
        registry=registry,
        sessions=sessions,
        metrics=metrics,
        server_token=server_token,
        lock_ttl=s.lock_ttl_s,
        pool_name=pool_name,
        pool_seal=pool_seal,
        local_endpoint=local_endpoint,
        tiers=tiers,
        kv_events=events,
    )
    return Core(l1, store, sessions, tiers, handler, events)
