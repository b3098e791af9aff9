"""`lmcache bench`: the server's data path measured next to ceilings from the same run.

A synthetic engine with a real model's KV geometry lives in shared memory and drives
a real ``lmcache server`` subprocess through the real client::

    bench process                                   lmcache server (subprocess)
    ┌──────────────────────────────┐   ZMQ (tcp)   ┌──────────────────────────┐
    │ LMCacheClient x N engines    │ ────────────▶ │ loop thread + workers    │
    │ ShmKVCache /lmcache_kv_*     │ ◀── maps ──── │ L1 pool /lmcache_l1_*    │
    │ ceilings: numpy copy,        │               │ L2: fs dir / redis-server│
    │ in-process gather/scatter,   │               └──────────────────────────┘
    │ raw pyzmq echo, raw file I/O,│
    │ redis-py                     │
    └──────────────────────────────┘

Each result is printed as a ratio to the ceiling measured in the same run, because the
machines are shared and absolute numbers drift. Modules:

    shapes      model KV geometries (``--model-shape``)
    harness     server subprocess, timing statistics, CPU accounting, thread runner
    ceilings    what a result is divided by
    transfers   store/retrieve in both CPU transfer modes, eviction steady state
    lookups     lookup latency and throughput
    l2          write-behind and prefetch through fs and Redis tiers
    report      rows, targets, the table and the JSON document
    options     the command line (light: `lmcache server` builds it too)
    runner      the order of phases, the progress bar and the outputs
"""
