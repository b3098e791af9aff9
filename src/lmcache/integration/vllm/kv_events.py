"""KV events: the blocks our stores put into LMCache, published by vLLM for KV-aware routers.

Only when vLLM runs with ``--kv-events-config '{"enable_kv_cache_events": true, ...}'``;
otherwise none of this runs (no hashes are copied into the step's metadata, nothing is
counted). The flow, in vLLM's own hooks::

    scheduler: _store_spec ── StoreSpec.event = StoredBlocks (vLLM's block hashes, tokens)
    worker:    the store finished ── its stored prefix of blocks ──> WorkerEvents (bounded)
               get_kv_connector_kv_cache_events ─> vLLM gathers every rank's events
    scheduler: update_connector_output ─> EventTally: an event is complete once every KV
               rank reported it (a chunk is loadable only when all ranks hold it)
               take_events ─> BlockStored(medium "CPU", ownership "lmcache") ─> publisher

Why vLLM's block hashes and not our chunk keys: a router indexes the blocks that vLLM
announces for its own GPU cache by those hashes, so the same prefix held by LMCache is
matched by the same hashes, with a medium that says where it is (as vLLM's native
offloading connector does). ``medium`` is vLLM's ``CPU`` (the L1 pool is host memory), and
``ownership`` is ``lmcache`` so that a router can tell our tier from vLLM's own offloading.

Removals, when the server keeps a KV event log (``--kv-event-log-size``): KV rank 0's
stores ask for their chunk keys, and `RemovalWatch` remembers which of our announced blocks
each key holds; every ``lmcache.mp.kv_event_poll_interval`` seconds it polls the log, and a
key that left L1 (evicted, cleared, deleted: whatever the cause, whoever caused it)
becomes ``BlockRemoved`` of those blocks. A log we lost track of (the ring wrapped past our
cursor, a server restart) withdraws every block we announced. Without a log, removals are
not announced (vLLM's own ``reset_cache`` still clears both, with ``AllBlocksCleared``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from lmcache.errors import LMCacheError
from lmcache.protocol.messages import KVEvents

logger = logging.getLogger("lmcache.integration")

MEDIUM = "CPU"  # vLLM's name for host memory, what L1 is
OWNERSHIP = "lmcache"  # which secondary tier announced the blocks
MAX_PENDING = 4096  # events waiting for the other ranks (scheduler), or for vLLM (worker)
MAX_WATCHED = 65536  # chunk keys whose removal rank 0 watches for (the oldest are dropped)


@dataclass(frozen=True)
class StoredBlocks:
    """One store's blocks, in vLLM's terms: ``block_hashes[i]`` is vLLM's hash of the
    block of ``token_ids[i*block_size:(i+1)*block_size]``, chained from ``parent``.
    Hashable, so that the ranks' reports of the same store count as one event."""

    block_hashes: tuple[Any, ...]  # vLLM's BlockHash values (bytes)
    parent: Any
    token_ids: tuple[int, ...]
    block_size: int
    cache_salt: str = ""
    first_block: int = 0  # index of the first block in its prompt (the salt is on block 0)

    def prefix(self, blocks: int) -> StoredBlocks | None:
        """The first ``blocks`` blocks (a store that ran out of L1 stored a prefix)."""
        if blocks <= 0:
            return None
        if blocks >= len(self.block_hashes):
            return self
        return StoredBlocks(
            self.block_hashes[:blocks], self.parent, self.token_ids[: blocks * self.block_size],
            self.block_size, self.cache_salt, self.first_block,
        )  # fmt: skip

    def extra_keys(self) -> list[tuple[Any, ...] | None]:
        """Per block, what vLLM puts beside the tokens into its hash, in its event form:
        the cache salt, on a prompt's first block (text prompts; LoRA and multimodal
        keys are not carried)."""
        keys: list[tuple[Any, ...] | None] = [None] * len(self.block_hashes)
        if self.cache_salt and self.first_block == 0 and keys:
            keys[0] = (self.cache_salt,)
        return keys


def stored_blocks(
    block_hashes: Sequence[Any] | None,
    tokens: Sequence[int],
    start: int,
    end: int,
    block_size: int,
    *,
    cache_salt: str = "",
) -> StoredBlocks | None:
    """The event of storing tokens ``[start, end)``, or None when vLLM's hashes do not
    cover that range block by block (another hash granularity: nothing is announced
    rather than something wrong)."""
    first, last = start // block_size, end // block_size
    if block_hashes is None or last <= first or len(block_hashes) < last:
        return None
    return StoredBlocks(
        block_hashes=tuple(block_hashes[first:last]),
        parent=block_hashes[first - 1] if first > 0 else None,
        token_ids=tuple(tokens[first * block_size : last * block_size]),
        block_size=block_size,
        cache_salt=cache_salt,
        first_block=first,
    )


@dataclass(frozen=True)
class RemovedBlocks:
    """Blocks we announced that the server no longer holds (KV rank 0 alone reports it)."""

    block_hashes: tuple[Any, ...]


class RemovalWatch:
    """KV rank 0's side of the server's KV event log: chunk key -> our announced blocks,
    and a poll of the log when one is due (`check`). Never raises: a failed poll is tried
    again at the next interval; a server without a log is not asked again."""

    def __init__(
        self, poll: Callable[[int], KVEvents], interval: float, limit: int = MAX_WATCHED
    ) -> None:
        self._poll = poll
        self.interval = interval
        self.limit = limit
        self._blocks: OrderedDict[bytes, tuple[Any, ...]] = OrderedDict()
        self._log = ""  # the log we follow ("" until the first answer)
        self._after = 0
        self._due = 0.0
        self.enabled = interval > 0

    def remember(self, keys: Sequence[bytes], event: StoredBlocks, chunk_size: int) -> None:
        """The stored range of ``event`` has these chunk keys, in order (a key's blocks
        are its chunk's, up to the blocks ``event`` holds)."""
        per_chunk = chunk_size // event.block_size
        for i, key in enumerate(keys):
            hashes = event.block_hashes[i * per_chunk : (i + 1) * per_chunk]
            if not hashes:
                break
            self._blocks[key] = hashes
            self._blocks.move_to_end(key)
        while len(self._blocks) > self.limit:
            self._blocks.popitem(last=False)

    def check(self, now: float | None = None) -> list[RemovedBlocks]:
        """Removals since the last poll, if a poll is due (else nothing)."""
        now = time.monotonic() if now is None else now
        if not self.enabled or now < self._due:
            return []
        self._due = now + self.interval
        try:
            reply = self._poll(self._after)
        except LMCacheError as exc:
            logger.debug("polling the LMCache KV event log failed: %s", exc)
            return []
        if not reply.enabled:
            self.enabled = False
            logger.info(
                "the LMCache server keeps no KV event log (start it with --kv-event-log-size "
                "N): blocks it evicts are not announced as removed"
            )
            return []
        out: list[RemovedBlocks] = []
        if self._log and (reply.log != self._log or reply.lost):
            out += self._forget_all()  # we missed removals: withdraw everything we announced
        self._log, self._after = reply.log, reply.next
        for record in reply.records:
            hashes = self._blocks.pop(record.key, None) if record.kind == "removed" else None
            if hashes:
                out.append(RemovedBlocks(hashes))
        return out

    def _forget_all(self) -> list[RemovedBlocks]:
        hashes = tuple(h for blocks in self._blocks.values() for h in blocks)
        self._blocks.clear()
        return [RemovedBlocks(hashes)] if hashes else []


class WorkerEvents:
    """The worker's finished stores, until vLLM takes them after the step (the store
    thread adds, the step takes; bounded: the oldest is dropped if vLLM never asks)."""

    def __init__(self, limit: int = MAX_PENDING) -> None:
        self._events: deque[StoredBlocks] = deque(maxlen=limit)
        self._lock = threading.Lock()

    def add(self, event: StoredBlocks | None) -> None:
        if event is not None:
            with self._lock:
                self._events.append(event)

    def take(self) -> list[StoredBlocks]:
        with self._lock:
            events = list(self._events)
            self._events.clear()
        return events


class EventTally:
    """Scheduler side: an event is announced once every KV rank has reported it (ranks
    finish their stores in different steps). Bounded: past `MAX_PENDING` incomplete
    events, the oldest is forgotten (a rank whose store failed never completes it)."""

    def __init__(self, ranks: int, limit: int = MAX_PENDING) -> None:
        self.ranks = max(1, ranks)
        self.limit = limit
        self._seen: OrderedDict[StoredBlocks, int] = OrderedDict()
        self._ready: list[StoredBlocks | RemovedBlocks] = []

    def add(self, events: Iterable[object]) -> None:
        for event in events:
            if isinstance(event, RemovedBlocks):
                self._ready.append(event)  # rank 0 alone watches removals
                continue
            if not isinstance(event, StoredBlocks):
                continue
            count = self._seen.pop(event, 0) + 1
            if count >= self.ranks:
                self._ready.append(event)
                continue
            self._seen[event] = count
            while len(self._seen) > self.limit:
                self._seen.popitem(last=False)

    def take(self) -> list[StoredBlocks | RemovedBlocks]:
        ready, self._ready = self._ready, []
        return ready


def to_vllm(events: Iterable[StoredBlocks | RemovedBlocks]) -> list[Any]:
    """vLLM's ``BlockStored`` / ``BlockRemoved`` events, hashes in the form vLLM publishes
    its own (bytes, or ints with ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES``); imported here:
    only a running vLLM calls this."""
    from vllm.distributed.kv_events import BlockRemoved, BlockStored
    from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash as external

    out: list[Any] = []
    for e in events:
        hashes = [external(h) for h in e.block_hashes]
        if isinstance(e, RemovedBlocks):
            out.append(BlockRemoved(block_hashes=hashes, medium=MEDIUM, ownership=OWNERSHIP))
            continue
        out.append(
            BlockStored(
                block_hashes=hashes,
                parent_block_hash=None if e.parent is None else external(e.parent),
                token_ids=list(e.token_ids),
                block_size=e.block_size,
                lora_id=None,
                medium=MEDIUM,
                lora_name=None,
                extra_keys=e.extra_keys(),
                ownership=OWNERSHIP,
            )
        )
    return out
