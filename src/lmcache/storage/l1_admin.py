"""Operator actions on L1 beyond the data path: list objects a page at a time, delete
chosen ones, clear only what nobody holds (``POST /cache/clear`` without ``force``).

Kept out of `lmcache.storage.l1` (whose subject is the data path), over its public
operator interface (`L1Cache.keys`, `objects`, `remove`), which follows L1's rules for
an object a copy still reads (doomed, freed after the copy), as `L1Cache.clear` does.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

from lmcache.storage.l1 import L1Cache
from lmcache.storage.l1_objects import Obj
from lmcache.types import ObjectKey

MAX_PAGE = 5000  # upstream's bound on one page of GET /cache/objects


def list_objects(
    l1: L1Cache, after: ObjectKey | None, limit: int
) -> tuple[list[dict[str, Any]], ObjectKey | None]:
    """Up to ``limit`` objects with keys above ``after``, in key order (stable across
    pages while objects come and go), and the key to continue after (None: the end)."""
    limit = max(1, min(limit, MAX_PAGE))
    keys = l1.keys()  # a copy: sorting a large index must not hold the lock
    keys.sort()
    start = 0 if after is None else bisect.bisect_right(keys, after)
    page = keys[start : start + limit]
    entries = [_describe(obj) for obj in l1.objects(page)]
    more = start + limit < len(keys)
    return entries, (page[-1] if more and page else None)


def _describe(obj: Obj) -> dict[str, Any]:
    return {
        "key": obj.key.hex(),
        "size_bytes": obj.extent.nbytes,
        "state": obj.state.value,
        "locked": obj.pins > 0,
        "hits": obj.stats.hits,
    }


def delete(l1: L1Cache, keys: Sequence[ObjectKey], force: bool) -> tuple[int, int]:
    """Remove ``keys`` from L1; locked or still-being-written objects only with ``force``.
    Returns (deleted, skipped); keys not in L1 count as neither."""
    return l1.remove(keys, force)


def clear_unlocked(l1: L1Cache) -> tuple[int, int]:
    """Remove every READY object that nobody holds. Returns (removed, kept)."""
    return l1.remove(None, force=False)
