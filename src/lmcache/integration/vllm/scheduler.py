"""The scheduler half of the connector: lookups, load plans and store plans.

Per request (a `_Tracker`)::

    get_num_new_matched_tokens ── lookup (async on the server; None = ask later)
            │ hit > vLLM's own prefix hit
            v
    update_state_after_alloc ──── plan a load of [floor(vllm_hit), hit) into the new
            │                     blocks; otherwise free the lookup's locks
            v
    build_connector_meta ──────── ship the load once; every step, store each newly
            │                     computed whole prompt chunk (each chunk once), and once
            │                     the prompt is computed, its tail's whole blocks
            v
    request_finished ──────────── end the server session (drops leftover locks); if it
                                  stored anything (async stores), keep its blocks until
                                  the workers report its stores done (`get_finished`)

Finer tails: a prompt's tail past its last whole chunk is stored as a *partial chunk* of
its whole vLLM blocks (`lmcache.storage.keys`), once the whole prompt is computed (not
at every step of a chunked prefill: each would be a new object). Lookups send the block
size, so a hit, and the load planned from it, may end on a block inside a chunk.

Hybrid models (several KV cache groups, `kv_groups.py`): the lookup asks the primary
group; each load and store is planned once per group, over that group's block ids
(its null blocks left out).

With vLLM's KV events on (``events``), each store carries vLLM's hashes of its blocks,
for the workers to announce once stored (`kv_events.py`). Lookups are counted for
vLLM's stats (`stats.py`).

Nothing here may raise into vLLM: an exception in a scheduler method kills the
engine, so every entry point falls back to "no cache" and logs instead.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lmcache.errors import LMCacheError
from lmcache.integration.vllm.identity import CacheIdentity
from lmcache.integration.vllm.kv_events import EventTally, stored_blocks
from lmcache.integration.vllm.kv_groups import NULL_BLOCK, held_load, held_store
from lmcache.integration.vllm.link import ServerLink
from lmcache.integration.vllm.metadata import LoadSpec, Metadata, StoreSpec
from lmcache.integration.vllm.stats import Tally

if TYPE_CHECKING:  # vLLM's own types (this module is unit-tested with small fakes of them)
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

logger = logging.getLogger("lmcache.integration")


@dataclass
class _Tracker:
    request_id: str
    tokens: list[int]  # the prompt (what lookups and stores cover)
    cache_salt: str
    hit: int | None = None  # LMCache hit in tokens; None while the lookup is pending
    lookup_sent: bool = False
    vllm_hit: int = 0  # tokens vLLM's own prefix cache already had
    load_planned: bool = False
    load_failed: bool = False
    stored: int = 0  # prompt tokens known to be in LMCache (stored or hit)
    stores_issued: bool = False  # a store was planned (it may still run on the workers)
    block_ids: list[list[int]] = field(default_factory=list)  # per KV cache group
    block_hashes: Sequence[Any] | None = None  # vLLM's, for KV events (the request's list)


class SchedulerSide:
    def __init__(
        self,
        link: ServerLink,
        identity: CacheIdentity,
        *,
        can_load: bool,
        can_store: bool,
        async_store: bool = True,
        events: bool = False,
        primary: int = 0,
        window_groups: Mapping[int, int] | None = None,
        async_loads: bool = False,
    ) -> None:
        """``identity``: the primary KV cache group's (the one lookups ask; `kv_groups`);
        ``window_groups``: the sliding-window groups and their windows in tokens (only
        they drop blocks while a request runs); ``async_loads``: vLLM waits for a load in
        a step of its own (WAITING_FOR_REMOTE_KVS), so that the workers can report a
        failed one as a failed request (hybrid models; see worker_groups.py)."""
        self.link = link
        self.identity = identity
        self.primary = primary
        self.window_groups = dict(window_groups or {})
        self.async_loads = async_loads
        self.chunk_size = link.chunk_size
        self.can_load = can_load
        self.can_store = can_store
        self._trackers: dict[str, _Tracker] = {}
        self._loads: list[LoadSpec] = []
        self.async_store = async_store
        self._finished_stores: list[str] = []  # for the next step's metadata
        self.stats = Tally()
        # KV events: vLLM's kv_events_config.enable_kv_cache_events (None: off, no cost)
        # (KV shared by every rank, MLA: rank 0 alone stores, so its report is the last)
        ranks = 1 if identity.shared_kv else identity.world_size
        self.events = EventTally(ranks) if events else None
        link.start_heartbeat()

    # ----- vLLM entry points (never raise) --------------------------------------------------

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        try:
            return self._matched(request, num_computed_tokens)
        except Exception:
            logger.exception(
                "lookup failed for request %s; computing without the cache", request.request_id
            )
            return 0, False

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        try:
            self._after_alloc(request, blocks, num_external_tokens)
        except Exception:
            logger.exception("planning the load of request %s failed", request.request_id)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> Metadata:
        meta = Metadata(loads=self._loads, finished_stores=self._finished_stores)
        self._loads, self._finished_stores = [], []
        meta.preempted = sorted(getattr(scheduler_output, "preempted_req_ids", None) or ())
        try:
            if self.can_store:
                meta.stores = self._plan_stores(scheduler_output)
        except Exception:
            logger.exception("planning stores failed; skipping them this step")
        return meta

    def request_finished(self, request: Request) -> bool:
        """End the request's server session; True: keep its blocks until the workers report
        its stores done (never raises: a False would free blocks under a running store, so
        the answer is decided before anything that can fail)."""
        tracker = self._trackers.pop(request.request_id, None)
        delay = tracker is not None and tracker.stores_issued and self.async_store
        if delay:
            self._finished_stores.append(request.request_id)
        if tracker is not None and tracker.lookup_sent and self.link.healthy:
            try:
                self.link.client.end_session(request.request_id)
            except LMCacheError as exc:
                self.link.mark_down(exc)
            except Exception:
                logger.exception("ending the session of request %s failed", request.request_id)
        return delay

    def reset_cache(self) -> bool:
        try:
            self.link.client.clear()
            return True
        except LMCacheError as exc:
            logger.warning("could not clear the LMCache server: %s", exc)
            return False

    # ----- internals -------------------------------------------------------------------

    def _matched(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        rid = request.request_id
        tracker = self._trackers.get(rid)
        if tracker is not None and _is_preempted(request):
            tracker = None  # its blocks are gone: look it up afresh
        elif tracker is not None and tracker.load_planned:
            # Asked again after a load was planned: the load failed and vLLM reset the
            # request. Compute it without the cache rather than wait on a second load, and
            # store it again (a group's chunks may be what was missing; present ones are
            # only counted as cached by the server).
            tracker.load_failed = True
            tracker.stored = min(tracker.stored, num_computed_tokens)
        if tracker is None:
            tokens = list(request.prompt_token_ids or [])
            tracker = _Tracker(rid, tokens, getattr(request, "cache_salt", None) or "")
            if self.events is not None:
                tracker.block_hashes = getattr(request, "block_hashes", None)
            self._trackers[rid] = tracker
        if tracker.load_failed or not self.can_load:
            return 0, False
        if tracker.hit is None and num_computed_tokens >= self._lookup_end(tracker):
            # vLLM's own prefix cache covers every whole block a lookup could add: no call
            # to the server, and no store of what vLLM had (it was stored when computed;
            # a tail of it may have been part of a longer prompt's chunk, not stored as a
            # partial chunk: we give that up rather than call the server for it).
            tracker.hit = 0
            tracker.stored = max(
                tracker.stored, min(num_computed_tokens, self._blocks_end(tracker))
            )
        if tracker.hit is None:
            tracker.hit = self._lookup(tracker)
            if tracker.hit is None:
                return None, False  # the server is still looking: vLLM asks again
            if tracker.lookup_sent:
                self.stats.add(lookup_tokens=self._blocks_end(tracker), hit_tokens=tracker.hit)
        tracker.vllm_hit = num_computed_tokens
        tracker.stored = max(tracker.stored, tracker.hit)
        hit = tracker.hit
        if hit >= len(tracker.tokens):
            hit = len(tracker.tokens) - 1  # vLLM must compute at least one token for logits
        need = hit - num_computed_tokens
        # A synchronous load: the worker copies the blocks in `start_load_kv` of the very
        # step that computes the rest of the prompt. An asynchronous one costs a step of
        # its own (profiled: the copy ran in a forward-less step) plus one to notice it
        # finished. A failed copy is reported through `get_block_ids_with_load_errors`,
        # and vLLM recomputes those blocks (the connector sets the "recompute" policy).
        # Hybrid models load asynchronously (`async_loads`): vLLM takes a failed load of a
        # model with several KV cache groups only as a failed request, not as blocks.
        return (need, self.async_loads) if need > 0 else (0, False)

    def _lookup_end(self, tracker: _Tracker) -> int:
        """The most prompt tokens a lookup can add to: whole blocks (whole chunks, then a
        partial one), but never the last token (vLLM computes it for the logits)."""
        return min(self._blocks_end(tracker), len(tracker.tokens) - 1)

    def _blocks_end(self, tracker: _Tracker) -> int:
        bs = self.identity.block_size
        return len(tracker.tokens) // bs * bs

    def _lookup(self, tracker: _Tracker) -> int | None:
        end = self._blocks_end(tracker)
        if end == 0 or not self.link.healthy:
            return 0
        ident = self.identity
        try:
            if not tracker.lookup_sent:
                tracker.lookup_sent = True
                return self.link.client.lookup(
                    tracker.request_id,
                    tracker.tokens[:end],
                    model_name=ident.model_name,
                    world_size=ident.world_size,
                    dtype=ident.dtype,
                    kv_spec=ident.kv_spec,
                    cache_salt=tracker.cache_salt,
                    block_size=ident.block_size,
                )
            return self.link.client.query_lookup(tracker.request_id)
        except LMCacheError as exc:
            self.link.mark_down(exc)
            return 0

    def _after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        tracker = self._trackers.get(request.request_id)
        if tracker is None:
            return
        tracker.block_ids = _per_group(blocks.get_block_ids()) if blocks is not None else []
        if num_external_tokens <= 0 or tracker.load_planned:
            if tracker.hit and not tracker.load_planned:
                self._free_locks(tracker)
            return
        c, bs = self.chunk_size, self.identity.block_size
        start = tracker.vllm_hit // c * c
        end = tracker.hit or 0
        for group, group_ids in enumerate(tracker.block_ids):
            ids = group_ids[start // bs : end // bs]
            window = group in self.window_groups
            skip = tracker.vllm_hit - start
            held = (
                held_load(start, end, ids, skip, bs=bs, chunk=c) if window else (start, ids, skip)
            )
            if held is None:
                continue  # (a window group: vLLM reads none of these blocks)
            first, block_ids, skip = held
            self._loads.append(
                LoadSpec(
                    request_id=tracker.request_id,
                    tokens=tracker.tokens[:end],
                    start=first,
                    end=end,
                    block_ids=block_ids,
                    skip_tokens=skip,
                    cache_salt=tracker.cache_salt,
                    group=group,
                )
            )
        tracker.load_planned = True
        if start > 0:  # chunks vLLM fully has: their locks are not needed
            self._free_locks(tracker, end=start)

    def _free_locks(self, tracker: _Tracker, end: int | None = None) -> None:
        if not self.link.healthy:
            return
        try:
            self.link.client.free_lookup(tracker.request_id, 0, end)
        except LMCacheError as exc:
            self.link.mark_down(exc)

    def _plan_stores(self, out: SchedulerOutput) -> list[StoreSpec]:
        stores = []
        for new in out.scheduled_new_reqs:
            tracker = self._trackers.get(new.req_id)
            if tracker is not None:
                tracker.block_ids = _per_group(new.block_ids)
                stores += self._store_specs(tracker, new.num_computed_tokens, out)
        cached = out.scheduled_cached_reqs
        for i, rid in enumerate(cached.req_ids):
            tracker = self._trackers.get(rid)
            if tracker is None:
                continue
            new_ids = cached.new_block_ids[i]
            if rid in cached.resumed_req_ids and new_ids is not None:
                tracker.block_ids = _per_group(new_ids)  # a resumed request's are all new
            elif new_ids is not None:
                if not tracker.block_ids:
                    tracker.block_ids = [[] for _ in new_ids]
                for ids, added in zip(tracker.block_ids, new_ids, strict=True):
                    ids.extend(added)
            stores += self._store_specs(tracker, cached.num_computed_tokens[i], out)
        return stores

    def _store_specs(
        self, tracker: _Tracker, computed: int, out: SchedulerOutput
    ) -> list[StoreSpec]:
        """This step's store of a request: one spec per KV cache group (the primary's
        carries the KV event)."""
        if not self.link.healthy or not tracker.block_ids:
            return []
        c, bs = self.chunk_size, self.identity.block_size
        done = computed + out.num_scheduled_tokens.get(tracker.request_id, 0)
        held = len(tracker.block_ids[self.primary]) * bs
        available = min(len(tracker.tokens), done, held)
        # Whole chunks as they are computed; the tail's whole blocks (a partial chunk) only
        # with the prompt's last token: every step of a chunked prefill would add another.
        end = available // bs * bs if available == len(tracker.tokens) else available // c * c
        start = tracker.stored // c * c
        if end <= tracker.stored:  # (stored may end inside a chunk: a partial hit or store)
            return []
        tracker.stored = end
        tracker.stores_issued = True
        specs = []
        for group, group_ids in enumerate(tracker.block_ids):
            ids = group_ids[start // bs : end // bs]
            kept: tuple[int, list[int]] | None = (start, ids)
            window = self.window_groups.get(group)
            if window is not None:
                # vLLM freed the blocks that left the window when it scheduled this step
                # (our copy of the table still names them): null them before trimming.
                freed = max(0, computed - window + 1) // bs - start // bs
                ids = [NULL_BLOCK] * min(max(freed, 0), len(ids)) + ids[max(freed, 0) :]
                kept = held_store(start, end, ids, bs, c)
            if kept is None:
                continue  # a window group no longer holds any of these blocks
            first, block_ids = kept
            event = None
            if self.events is not None and group == self.primary:
                event = stored_blocks(
                    tracker.block_hashes, tracker.tokens, first, end, bs,
                    cache_salt=tracker.cache_salt,
                )  # fmt: skip
            specs.append(
                StoreSpec(
                    request_id=tracker.request_id,
                    tokens=tracker.tokens[:end],
                    start=first,
                    end=end,
                    block_ids=block_ids,
                    cache_salt=tracker.cache_salt,
                    event=event,
                    group=group,
                )
            )
        return specs


def _per_group(block_ids: Sequence[Sequence[int]]) -> list[list[int]]:
    """vLLM's block ids, one list per KV cache group (one group without the hybrid
    manager, or for a model whose layers are all alike)."""
    return [list(ids) for ids in block_ids]


def _is_preempted(request: Request) -> bool:
    status = getattr(request, "status", None)
    return getattr(status, "name", "") == "PREEMPTED"
