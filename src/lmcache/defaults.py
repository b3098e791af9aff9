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
