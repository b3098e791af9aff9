"""The storage entry point: every chunk written to or read from L1 goes through `ChunkStore`.

    copies (engine memory, bytes in messages) ─┐                 ┌─> L1Cache (pool, pins,
    prepared transfers (the worker copies)   ──┼─> ChunkStore ───┤    eviction, clear)
    L2 prefetch, L2 write-behind, sessions   ──┘   write / read  ├─> on_stored hook (L2)
                                                                 └─> on_committed hook
                                                                     (the KV event log)

A write is always the same few steps, written once here: reserve each chunk (or learn
that it is cached, unreadable with this layout, or that L1 is full of pinned chunks),
fill it outside the L1 lock, commit it, and tell the ``on_stored`` hook (the L2
write-behind queue). A read pins every chunk or none (a partial retrieve would hand the
engine a hole), copies, and fails if a forced clear raced the copy, so bytes that were
cleared are never reported as retrieved. Callers get small result objects, never strings.

Prepared transfers split a write or a read across requests (the worker copies between
them), so `reserve` / `commit` / `abort` and `pin` / `unpin` are the same steps, apart.

A range may end with a partial chunk (``tail``: its own, smaller layout). Partial chunks
live in L1 only: the ``on_stored`` hook never hears of them, so they are never written
to L2 (a prompt's tail is small and short-lived; L2 prefetches whole chunks only).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from lmcache.errors import CacheMissError, TransferError
from lmcache.storage.l1 import L1Cache, Lease, Refused, WriteSlot
from lmcache.types import ObjectKey

StoredHook = Callable[[ObjectKey, bytes], None]  # (key, layout tag): a chunk became READY
CommittedHook = Callable[[ObjectKey], None]  # any chunk became READY (partial, from L2: all)
# Fill chunk i of a write into its L1 bytes. Raise to abort the whole write, or return
# False to abort this chunk and stop there (the source did not have it).
Fill = Callable[[int, np.ndarray], "bool | None"]


@dataclass(frozen=True, slots=True)
class ChunkLayout:
    """What one chunk's bytes look like: its layout tag (readers of another layout see a
    miss) and its size."""

    tag: bytes
    nbytes: int


@dataclass(slots=True)
class WriteResult:
    """What a write did with each of its chunks, in order, stopping at the first that
    could not be placed (``no_space``) or filled (``unfilled``)."""

    stored: int = 0
    cached: int = 0  # already there (or being written by someone else)
    conflicts: int = 0  # there with another layout: this writer could never read it back
    no_space: bool = False
    unfilled: bool = False
    tail: str = ""  # which of the three a partial last chunk counts in ("": none, or not reached)

    def tokens(self, kind: str, chunk_size: int, tail_tokens: int) -> int:
        """Tokens of the chunks counted in ``kind`` ("stored", "cached" or "conflicts"):
        a partial last chunk counts its own tokens, not a chunk's."""
        count: int = getattr(self, kind)
        short = chunk_size - tail_tokens if self.tail == kind else 0
        return count * chunk_size - short


@dataclass(slots=True)
class Reservation:
    """Slots a worker fills between `ChunkStore.reserve` and `commit`: ``offsets[i]`` is
    chunk i's place in the pool, or -1 when there is nothing to write (cached)."""

    offsets: list[int] = field(default_factory=list)
    slots: list[WriteSlot] = field(default_factory=list)  # whole chunks'
    tail_slot: WriteSlot | None = None  # a partial last chunk's (commit with `commit_tail`)
    no_space: bool = False


class ChunkStore:
    def __init__(
        self, l1: L1Cache, *, on_stored: StoredHook | None = None,
        on_committed: CommittedHook | None = None,
    ) -> None:  # fmt: skip
        """``on_stored``: the L2 write-behind (whole chunks from engines); ``on_committed``:
        every chunk that became READY, whatever its source (the KV event log)."""
        self.l1 = l1
        self._on_stored = on_stored
        self._on_committed = on_committed

    # ----- writes ----------------------------------------------------------------------

    def write(
        self, keys: Sequence[ObjectKey], layout: ChunkLayout, fill: Fill, *, notify: bool = True,
        tail: ChunkLayout | None = None, salt: str = "",
    ) -> WriteResult:  # fmt: skip
        """Reserve, fill, commit each chunk; ``notify``: tell the on_stored hook (not for
        chunks that came from L2 in the first place); ``tail``: the last key is a partial
        chunk of that layout (never told to the hook); ``salt``: the request's cache_salt
        (per-salt quotas count by it)."""
        result = WriteResult()
        for i, key in enumerate(keys):
            last = tail is not None and i == len(keys) - 1
            lay = tail if last and tail is not None else layout
            slot = self.l1.reserve_write(key, lay.nbytes, tag=lay.tag, salt=salt)
            if isinstance(slot, Refused):
                if slot is Refused.NO_SPACE:
                    result.no_space = True
                    break
                kind = "cached" if slot is Refused.CACHED else "conflicts"
                setattr(result, kind, getattr(result, kind) + 1)
                result.tail = kind if last else ""
                continue
            try:
                filled = fill(i, self.l1.view(slot.offset, slot.nbytes))
            except BaseException:
                self.l1.abort_write(slot)
                raise
            if filled is False:
                self.l1.abort_write(slot)
                result.unfilled = True
                break
            stored = self._commit_one(slot, lay.tag, notify and not last)
            result.stored += stored
            result.tail = "stored" if last and stored else ""
        return result

    def reserve(
        self, keys: Sequence[ObjectKey], layout: ChunkLayout, ttl: float,
        tail: ChunkLayout | None = None, salt: str = "",
    ) -> Reservation:  # fmt: skip
        """Reserve slots for another process to fill (they expire after ``ttl``); ``tail``
        and ``salt`` as for `write`."""
        res = Reservation()
        for i, key in enumerate(keys):
            last = tail is not None and i == len(keys) - 1
            lay = tail if last and tail is not None else layout
            slot = self.l1.reserve_write(key, lay.nbytes, ttl=ttl, tag=lay.tag, salt=salt)
            if slot is Refused.NO_SPACE:
                res.no_space = True
                break
            if isinstance(slot, Refused):
                res.offsets.append(-1)  # nothing to write
                continue
            res.offsets.append(slot.offset)
            if last:
                res.tail_slot = slot
            else:
                res.slots.append(slot)
        return res

    def commit(self, slots: Iterable[WriteSlot], tag: bytes) -> int:
        """Make filled slots READY; returns how many were (cleared or expired ones are not)."""
        return sum(self._commit_one(slot, tag, True) for slot in slots)

    def commit_tail(self, slot: WriteSlot) -> bool:
        """Make a filled partial chunk READY (L1 only: the on_stored hook is not told)."""
        return bool(self._commit_one(slot, b"", False))

    def abort(self, slots: Iterable[WriteSlot]) -> None:
        for slot in slots:
            self.l1.abort_write(slot)

    def _commit_one(self, slot: WriteSlot, tag: bytes, notify: bool) -> int:
        if not self.l1.commit_write(slot):
            return 0
        if self._on_committed is not None:
            self._on_committed(slot.key)
        if notify and self._on_stored is not None:
            self._on_stored(slot.key, tag)
        return 1

    # ----- reads -----------------------------------------------------------------------

    @contextmanager
    def read(
        self, keys: Sequence[ObjectKey], tag: bytes, owner: str, what: str = "the range",
        tail_tag: bytes | None = None,
    ) -> Iterator[list[np.ndarray]]:  # fmt: skip
        """Pin every chunk (CacheMissError if any is missing) and yield their bytes; on
        leaving, unpin, and raise TransferError if a clear raced the copy. ``what`` names
        the chunks in the miss message; ``tail_tag``: the last key is a partial chunk
        written with that layout."""
        lease = self.pin(keys, tag, owner, tail_tag=tail_tag)
        if lease is None:
            raise CacheMissError(
                f"chunks for {what} are not cached (evicted, cleared or stored with another "
                "layout); recompute them"
            )
        try:
            yield [self.l1.view(o, n) for o, n in lease.offsets(keys)]
        finally:
            intact = self.unpin(lease)
        if not intact:
            raise TransferError("the cache was cleared during the copy; recompute")

    def pin(
        self, keys: Sequence[ObjectKey], tag: bytes, owner: str, ttl: float | None = None,
        tail_tag: bytes | None = None,
    ) -> Lease | None:  # fmt: skip
        """Pin every chunk for a copy, or nothing (None) if any is missing or has another
        layout (``tail_tag``: the last key's, a partial chunk). Copies done by other
        processes get a ``ttl``; server threads' copies do not."""
        if tail_tag is None or not keys:
            return self.l1.acquire_all(keys, owner=owner, ttl=ttl, tag=tag)
        lease = self.l1.acquire_all(keys[:-1], owner=owner, ttl=ttl, tag=tag)
        if lease is None:
            return None
        if self.l1.extend(lease, [[keys[-1]]], tag=tail_tag) != 1:
            self.l1.release(lease)
            return None
        return lease

    def unpin(self, lease: Lease, keys: Iterable[ObjectKey] | None = None) -> bool:
        """Release ``keys`` (default: all) of a lease. False if any was cleared meanwhile."""
        return self.l1.release(lease, keys)

    def view(self, offset: int, nbytes: int) -> np.ndarray:
        return self.l1.view(offset, nbytes)

    # ----- lookups ---------------------------------------------------------------------

    def hold_prefix(self, groups: Iterable[Sequence[ObjectKey]], owner: str, ttl: float) -> Lease:
        """Pin the longest run of chunk groups (one key per rank) that are all READY."""
        return self.l1.acquire_prefix(groups, owner=owner, ttl=ttl)

    def extend(self, lease: Lease, groups: Iterable[Sequence[ObjectKey]]) -> int:
        """Pin more groups into a live lookup lease; returns how many."""
        return self.l1.extend(lease, groups)

    def clear(self) -> int:
        return self.l1.clear()
