"""Small value types shared by every layer.

`NewType`s keep raw bytes/ints with different meanings from being mixed up: a
chunk hash is not an object key, and an engine instance id is not a token count.
"""

from typing import NewType

ChunkHash = NewType("ChunkHash", bytes)
"""sha256 digest of a chunk of tokens, chained over every chunk before it (32 bytes)."""

ObjectKey = NewType("ObjectKey", bytes)
"""Key of one stored chunk: namespace digest (16 bytes) + chunk hash (32 bytes)."""

RequestId = NewType("RequestId", str)
"""The engine's request id; lookup sessions and their locks are keyed by it."""

InstanceId = NewType("InstanceId", int)
"""One registered engine worker (one KV-cache rank), e.g. the worker's pid."""
