"""Small value types shared by every layer.

`NewType`s keep raw bytes with different meanings from being mixed up: a chunk hash
is not an object key.
"""

from typing import NewType

ChunkHash = NewType("ChunkHash", bytes)
"""sha256 digest of a chunk of tokens, chained over every chunk before it (32 bytes)."""

ObjectKey = NewType("ObjectKey", bytes)
"""Key of one stored chunk: namespace digest (16 bytes) + chunk hash (32 bytes)."""
