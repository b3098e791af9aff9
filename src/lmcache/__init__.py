"""LMCache multiprocess mode: a standalone KV-cache server for LLM serving engines.

The package is laid out by architectural layer (see README.md, "Architecture"):

    protocol/   typed wire messages (msgspec, never pickle)
    transport/  ZMQ server loop and client transports
    storage/    L1 shared-memory pool, page allocator, eviction policies, chunk keys
    engine/     engine-side KV segments and the one block copy routine (C, SIGBUS-safe)
    server/     request handlers, registered engines, sessions, metrics, process runtime
    http/       FastAPI frontend (/healthcheck, /status, /clear-cache, /metrics)
    cli.py      the `lmcache` command
"""

__version__ = "0.1.0"
