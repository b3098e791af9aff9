"""Storage: the L1 shared-memory pool, its allocator, eviction policies and chunk keys."""
