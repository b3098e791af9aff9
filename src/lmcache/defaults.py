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

RPC_TIMEOUT_S = 5.0
"""Seconds a client waits for a reply before it counts the server as down."""

HASH_MEMO_MB = 64
"""MiB of recent prompts' hash chains the server remembers (~4,000 prompts of 4k tokens)."""

L2_QUEUE_SIZE = 1024
"""Chunks waiting to be copied to L2 at most; a chunk beyond it is skipped (L2 is a cache)."""

L2_PREFETCH_WORKERS = 2
"""Threads that look chunks up in L2 and load them into L1."""

L2_WRITERS = 2
"""Threads that copy stored chunks to L2, each on its own connection: while one hashes its
next chunk or waits for Redis' reply to the last, the other's bytes keep Redis reading."""

L2_BREAKER_S = 5.0
"""Seconds an L2 adapter is skipped after a failure, so lookups do not wait for its timeout."""
