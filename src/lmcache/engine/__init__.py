"""The engine side of shared memory: KV segments an engine creates (`shm_kv`) and the one
block copy routine (`transfer`), used by engine workers and, on their memory, the server."""
