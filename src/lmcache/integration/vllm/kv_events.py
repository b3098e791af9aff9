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

Removals: a store's event is announced once; what we learn of removals is vLLM's own reset
(`reset_cache` clears the server too, and vLLM then publishes ``AllBlocksCleared``).
Evictions inside the server are not announced (README, "KV events").
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

MEDIUM = "CPU"  # vLLM's name for host memory, what L1 is
OWNERSHIP = "lmcache"  # which secondary tier announced the blocks
MAX_PENDING = 4096  # events waiting for the other ranks (scheduler), or for vLLM (worker)


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
        self._ready: list[StoredBlocks] = []

    def add(self, events: Iterable[object]) -> None:
        for event in events:
            if not isinstance(event, StoredBlocks):
                continue
            count = self._seen.pop(event, 0) + 1
            if count >= self.ranks:
                self._ready.append(event)
                continue
            self._seen[event] = count
            while len(self._seen) > self.limit:
                self._seen.popitem(last=False)

    def take(self) -> list[StoredBlocks]:
        ready, self._ready = self._ready, []
        return ready


def to_vllm(events: Iterable[StoredBlocks]) -> list[Any]:
    """vLLM's ``BlockStored`` events, hashes in the form vLLM publishes its own (bytes, or
    ints with ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES``); imported here: only a running vLLM
    calls this."""
    from vllm.distributed.kv_events import BlockStored
    from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash as external

    return [
        BlockStored(
            block_hashes=[external(h) for h in e.block_hashes],
            parent_block_hash=None if e.parent is None else external(e.parent),
            token_ids=list(e.token_ids),
            block_size=e.block_size,
            lora_id=None,
            medium=MEDIUM,
            lora_name=None,
            extra_keys=e.extra_keys(),
            ownership=OWNERSHIP,
        )
        for e in events
    ]
