"""Defaults that more than one layer needs, each written once.

The server (`lmcache.settings.ServerSettings`, which turns them into flags and
``LMCACHE_*`` variables) and its clients (`LMCacheClient`, the ZMQ transport, the vLLM
connector's ``lmcache.mp.*`` settings) must agree on them: an engine told nothing has to
find a server started with nothing. This module imports nothing, so every layer may
import it.
"""

from __future__ import annotations

SERVER_PORT = 5555
"""The ZMQ port the server binds (``--port``) and the port clients try by default."""

L1_SIZE_GB = 4.0
"""GiB of the server's L1 pool (``--l1-size-gb``); the vLLM connector names it when no
server answers, so the two must not disagree."""

RPC_TIMEOUT_S = 5.0
"""Seconds a client waits for a reply before it counts the server as down."""

HASH_MEMO_MB = 64
"""MiB of recent prompts' hash chains the server remembers (~4,000 prompts of 4k tokens)."""

L2_QUEUE_SIZE = 1024
"""Chunks waiting to be copied to L2 at most; a chunk beyond it is skipped (L2 is a cache)."""

L2_PREFETCH_WORKERS = 2
"""Threads that look chunks up in L2 and load them into L1."""

L2_WRITERS = 1
"""Threads that copy stored chunks to L2, each on its own connection. More help only where
one leaves the tier idle (a round trip over a network, several Cluster shards); against
one redis-server on loopback, 2 measured no faster than 1: redis-server's own CPU is the
limit there (issue 12, README "What limits the misses")."""

L2_BREAKER_S = 5.0
"""Seconds an L2 adapter is skipped after a failure, so lookups do not wait for its timeout."""

KV_EVENT_POLL_S = 0.5
"""Seconds between the vLLM connector's polls of the server's KV event log (removals), when
vLLM publishes KV events and the server keeps a log (``--kv-event-log-size``)."""

COPY_THREADS = 0
"""Threads that one block copy (`BlockCopier`) splits its bytes over; 0 = auto: up to 4, at
most the CPUs this process may run on. A copy gets one thread per 512 KiB at most (one
under 1 MiB): waking a thread costs more than it saves there."""

EVICTION_RATIO = 0.2
"""Share of the L1 capacity the watermark thread frees below the watermark (upstream's
``--eviction-ratio``): at 0.8 and 0.2 it evicts from 80% down to 60% used."""

EVICTION_INTERVAL_S = 1.0
"""Seconds between two checks of the watermark thread (upstream's eviction loop period)."""

METRICS_NAMES = "both"
"""Which metric names /metrics shows (``--metrics-names``): ours (``lmcache_*``), upstream
LMCache's (``lmcache_mp_*``, so its Grafana dashboard works), or both."""

METRICS_MAX_MODELS = 64
"""Model names that get series of their own in the ``model_name`` label; later ones count
as "other" (clients choose model names: the label's cardinality must stay bounded)."""

PROGRESS_EVERY_S = 5.0
"""Seconds between two progress lines of a long start-up step (pre-faulting a large L1
pool, indexing an fs L2 tier); a step shorter than this logs none."""
