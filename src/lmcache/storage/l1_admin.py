"""Operator actions on L1 beyond the data path: list objects a page at a time, delete
chosen ones, clear only what nobody holds (``POST /cache/clear`` without ``force``).

Kept out of `lmcache.storage.l1` (whose subject is the data path) but written against its
internals on purpose: each action must take L1's one lock and follow its rules for an
object a copy still reads (doomed, freed after the copy), exactly as `L1Cache.clear` does.
A removed object's heap entry is left behind; eviction skips entries whose object left
the index.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

from lmcache.storage.l1 import L1Cache, ObjState, _Obj
from lmcache.types import ObjectKey

MAX_PAGE = 5000  # upstream's bound on one page of GET /cache/objects


def list_objects(
    l1: L1Cache, after: ObjectKey | None, limit: int
) -> tuple[list[dict[str, Any]], ObjectKey | None]:
    """Up to ``limit`` objects with keys above ``after``, in key order (stable across
    pages while objects come and go), and the key to continue after (None: the end)."""
    limit = max(1, min(limit, MAX_PAGE))
    with l1._lock:
        keys = list(l1._index)  # a copy: sorting a large index must not hold the lock
    keys.sort()
    start = 0 if after is None else bisect.bisect_right(keys, after)
    page = keys[start : start + limit]
    entries = []
    with l1._lock:
        for key in page:
            obj = l1._index.get(key)
            if obj is not None:
                entries.append(_describe(obj))
    more = start + limit < len(keys)
    return entries, (page[-1] if more and page else None)


def _describe(obj: _Obj) -> dict[str, Any]:
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
    deleted = skipped = 0
    with l1._lock:
        for key in keys:
            obj = l1._index.get(key)
            if obj is None:
                continue
            if not force and (obj.pins > 0 or obj.state is ObjState.WRITING):
                skipped += 1
                continue
            _remove(l1, obj)
            deleted += 1
    return deleted, skipped


def clear_unlocked(l1: L1Cache) -> tuple[int, int]:
    """Remove every READY object that nobody holds. Returns (removed, kept)."""
    removed = kept = 0
    with l1._lock:
        for obj in list(l1._index.values()):
            if obj.pins > 0 or obj.state is ObjState.WRITING:
                kept += 1
                continue
            _remove(l1, obj)
            removed += 1
    return removed, kept


def _remove(l1: L1Cache, obj: _Obj) -> None:
    """Out of the index; pages freed now, or by the last copy using them (as `clear`)."""
    del l1._index[obj.key]
    l1._discard(obj)
