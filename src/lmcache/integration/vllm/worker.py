"""The worker half of the connector: registration, loads and stores.

Loads are staged in `start_load_kv` (the server's RPC, before the forward that needs them)
and copied layer by layer while the forward pass runs (`layered_load.py`), or all at once
in `start_load_kv` until vLLM has shown it waits for each layer, for a step that loads
fewer than ``layered_min_tokens``, and always where the server copies itself
(engine_driven) or ``lmcache.mp.layerwise_load = false``. Stores
are queued in `wait_for_save`, after the forward, and run on a thread (`StoreQueue`) while
the engine goes on; how a block is kept from being reused under a running store is told in
`store_queue.py`. ``lmcache.mp.async_store = false`` runs them inside `wait_for_save`.

How the bytes move is a `TransferPath` (see `transfer_paths.py`), picked at every
registration, the first and each one after a server restart (`registration.py`: the
mode's shared-memory path, or bytes in the messages where the server's memory is out
of reach).

A failed load reports its blocks as load errors (vLLM recomputes them); a failed
store is only logged. While the server is down, both are skipped (see `link.py`).

Every load and store is counted for vLLM's stats (`stats.py`); with vLLM's KV events on,
a finished store's blocks (what the server holds of them) wait in `events` for vLLM to
take them after the step, and KV rank 0 watches the server's KV event log for their
removal (`removals`; `kv_events.py`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from lmcache.defaults import COPY_THREADS, KV_EVENT_POLL_S
from lmcache.errors import LMCacheError, ServerUnavailableError
from lmcache.integration.vllm.config import TransferMode
from lmcache.integration.vllm.cpus import move_to_spare_cpus
from lmcache.integration.vllm.identity import CacheIdentity
from lmcache.integration.vllm.kv_events import RemovalWatch, WorkerEvents
from lmcache.integration.vllm.layered_load import LayeredLoads
from lmcache.integration.vllm.link import ServerLink
from lmcache.integration.vllm.metadata import LoadSpec, Metadata, ParallelStrategy, StoreSpec
from lmcache.integration.vllm.registration import Registration, check_chunk_size
from lmcache.integration.vllm.stats import Tally
from lmcache.integration.vllm.store_queue import StoreQueue
from lmcache.integration.vllm.transfer_paths import Held, StagedLoad, TransferPath
from lmcache.protocol.messages import KVLayout
from lmcache.storage.shm import ShmSegment

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("lmcache.integration")


class WorkerSide:
    def __init__(
        self,
        link: ServerLink,
        identity: CacheIdentity,
        parallel: ParallelStrategy,
        mode: TransferMode,
        *,
        can_load: bool,
        can_store: bool,
        async_store: bool = True,
        copy_threads: int = COPY_THREADS,
        layerwise_load: bool = True,
        layered_min_tokens: int = 0,
        events: bool = False,
        event_poll_s: float = KV_EVENT_POLL_S,
        instance_id: int | None = None,
    ) -> None:
        """``instance_id`` names this worker's registration (the server's "GPU ID"): the
        process id unless given (tests that run several ranks in one process)."""
        self.link = link
        self.copy_threads = copy_threads
        self.identity = identity
        self.parallel = parallel
        self.requested_mode = mode
        self.mode: TransferMode = "lmcache_driven" if mode == "auto" else mode
        self.can_load = can_load
        self.can_store = can_store
        self.instance_id = os.getpid() if instance_id is None else instance_id
        self.chunk_size = link.chunk_size
        self._reg = Registration(
            link, identity, parallel, self.mode,
            instance_id=self.instance_id, chunk_size=self.chunk_size,
        )  # fmt: skip
        self._load_errors: set[int] = set()
        self._failed_loads: set[str] = set()  # requests whose load failed in this step
        self._stores = StoreQueue(self._store_one) if async_store and can_store else None
        self.layerwise_load = layerwise_load
        self.layered_min_tokens = layered_min_tokens  # fewer in a step: copied before it
        self._layered: LayeredLoads[LoadSpec] | None = None  # set by register_kv_caches
        self._layered_began: list[tuple[LoadSpec, float]] = []  # this step's layered loads
        self.stats = Tally()
        self.counts_tokens = True  # False: another group's worker counts them
        self.events = WorkerEvents() if events and can_store else None  # None: vLLM's are off
        self.removals = (
            RemovalWatch(link.client.poll_kv_events, event_poll_s)
            if self.events is not None and parallel.rank == 0 and event_poll_s > 0
            else None
        )
        link.instance_id = self.instance_id
        link.on_recover = self._reg.register

    @property
    def stores_async(self) -> bool:
        """Whether stores run on the store thread (and `finished_stores` reports them)."""
        return self._stores is not None

    @property
    def path(self) -> TransferPath | None:
        """How KV bytes move now (None until registered)."""
        return self._reg.path

    @property
    def uses_bytes(self) -> bool:
        """Whether KV bytes travel in the messages (no memory shared with the server)."""
        return self.path is not None and self.path.uses_bytes

    # ----- registration -------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from lmcache.integration.vllm import kv_memory

        logger.info("Registering kv caches!")
        check_chunk_size(self.chunk_size, self.identity.block_size)  # before moving memory
        view = kv_memory.describe(kv_caches, self.identity.block_size)
        logger.info("Creating transfer context (device_type=cpu, mode=%s)", self.mode)
        segments = kv_memory.migrate_to_shm(view) if self.mode == "engine_driven" else []
        self.register_memory(view.layout, view.arrays(), segments, layer_names=list(kv_caches))

    def register_memory(
        self,
        layout: KVLayout,
        arrays: list[np.ndarray],
        segments: Sequence[ShmSegment] = (),
        layer_names: Sequence[str] = (),
    ) -> None:
        """Register KV memory given as byte arrays: what `register_kv_caches` makes of
        vLLM's tensors, and what tests give directly. ``segments`` are the shared-memory
        segments that hold ``arrays`` (engine_driven); shutdown unlinks them. With
        ``layer_names`` (vLLM's, in layout order), loads may be pipelined by layer."""
        self._reg.register_memory(layout, arrays, segments, self.copy_threads)
        if self.layerwise_load and self.can_load and len(layer_names) == layout.num_layers:
            self._layered = LayeredLoads(
                layer_names,
                self._layer_load_failed,
                place=partial(move_to_spare_cpus, "layered KV loads"),
            )

    # ----- loads and stores -----------------------------------------------------------------

    def start_load(self, meta: Metadata) -> None:
        layered = self._layered if self._layered is not None and self._layered.ready else None
        staged: list[tuple[LoadSpec, StagedLoad]] = []
        began: dict[int, float] = {}
        for spec in meta.loads:
            path = self.path
            began[id(spec)] = time.perf_counter()
            ok = (
                self.can_load
                and path is not None
                and self.link.healthy
                and self._moved("load", spec.request_id, partial(self._load, path, spec, staged))
            )
            if not ok:
                self._load_failed(spec)
            elif not staged or staged[-1][0] is not spec:  # the server copied it already
                self._load_done(spec, began[id(spec)])
        if layered is not None and _tokens(staged) >= self.layered_min_tokens:
            layered.begin(staged)
            self._layered_began = [(spec, began[id(spec)]) for spec, _ in staged]
            return
        for spec, load in staged:  # all at once, before the forward pass
            if self._moved("load", spec.request_id, load.run):
                self._load_done(spec, began[id(spec)])
            else:
                self._load_failed(spec)

    def _load(self, path: TransferPath, spec: LoadSpec, staged: list[Any]) -> None:
        load = path.stage_load(spec)
        if load is not None:  # None: the server has copied it already
            staged.append((spec, load))

    def wait_for_layer(self, layer_name: str) -> None:
        """In the forward pass, before attention reads ``layer_name``'s KV cache."""
        if self._layered is not None:
            self._layered.wait(layer_name)

    def _end_layered_step(self) -> None:
        if self._layered is None:
            return
        failed = {id(spec) for spec in self._layered.end_step()}
        jobs, self._layered_began = self._layered_began, []
        for spec, began in jobs:
            if id(spec) in failed:
                self._load_failed(spec)
            else:
                self._load_done(spec, began)

    def _layer_load_failed(self, spec: LoadSpec, exc: Exception) -> None:
        self._failed("load", spec.request_id, exc)

    def _load_done(self, spec: LoadSpec, began: float) -> None:
        first = spec.skip_tokens // self.identity.block_size
        tokens = spec.end - spec.start - first * self.identity.block_size
        self._count(load_tokens=tokens)
        self.stats.add(load_bytes=self._bytes(tokens), load_seconds=time.perf_counter() - began)

    def _load_failed(self, spec: LoadSpec) -> None:
        """vLLM recomputes the blocks of a failed load (the skipped ones it has already)."""
        first = spec.skip_tokens // self.identity.block_size
        self._load_errors.update(spec.block_ids[first:])
        self._failed_loads.add(spec.request_id)
        self._count(failed_loads=1)

    def handle_preemptions(self, meta: Metadata) -> None:
        """Before this step touches any block: a preempted request's blocks are free again
        and this step's forward may write them, so the stores still reading blocks must
        end first (all of them: preemption is rare, and a store is bounded by its RPC
        timeouts)."""
        if self._stores is not None and meta.preempted and self._stores.in_flight:
            self._stores.wait()

    def step_failures(self) -> set[str]:
        """Requests whose load failed in this step (so far)."""
        self._end_layered_step()
        return set(self._failed_loads)

    def save(self, meta: Metadata, failed_elsewhere: set[str] | None = None) -> None:
        """After the forward: queue (or run) this step's stores. A request whose load failed
        in this step computed its later tokens over blocks that hold no valid KV (vLLM
        recomputes them next step), so none of its stores from this step are kept; nor
        where its load of another KV cache group failed (``failed_elsewhere``)."""
        self._end_layered_step()
        failed, self._failed_loads = self._failed_loads | (failed_elsewhere or set()), set()
        stores = [s for s in meta.stores if s.request_id not in failed] if self.can_store else []
        if self._stores is None:
            for spec in stores:
                self._store_one(spec)
            return
        self._stores.finish(meta.finished_stores)
        self._stores.submit(stores)

    def _store_one(self, spec: StoreSpec) -> None:
        path = self.path
        if path is None or not self.link.healthy:
            return  # degraded: skipped (the scheduler's stores are best effort)
        if self.identity.shared_kv and self.parallel.rank != 0:
            return  # every rank holds the same KV (MLA): rank 0 writes it once for all
        began, held = time.perf_counter(), Held(0)
        want_keys = self.removals is not None and spec.event is not None

        def store() -> None:
            nonlocal held
            # what the server holds now (its chunk keys too, when we watch removals)
            held = path.store(spec, want_keys=True) if want_keys else path.store(spec)

        if not self._moved("store", spec.request_id, store):
            self._count(failed_stores=1)
            return
        tokens = spec.end - spec.start
        self._count(store_tokens=tokens)
        self.stats.add(store_bytes=self._bytes(tokens), store_seconds=time.perf_counter() - began)
        if self.events is not None and spec.event is not None:
            stored = spec.event.prefix(held.tokens // self.identity.block_size)
            self.events.add(stored)
            if self.removals is not None and stored is not None:
                self.removals.remember(held.keys, stored, self.chunk_size)

    def _count(self, **counts: float) -> None:
        """Token and failure counts: KV rank 0's only (every rank moves the same tokens),
        and of one KV cache group only (`counts_tokens`)."""
        if self.parallel.rank == 0 and self.counts_tokens:
            self.stats.add(**counts)

    def _bytes(self, tokens: int) -> int:
        layout = self._reg.layout
        if layout is None:
            return 0
        return tokens // layout.block_size * layout.num_layers * layout.block_bytes

    def _moved(self, what: str, request_id: str, move: Callable[[], None]) -> bool:
        """Run one load or store; a failure is logged (and a server that stopped answering
        puts the link in degraded mode), never raised into vLLM."""
        try:
            move()
            return True
        except Exception as exc:
            self._failed(what, request_id, exc)
        return False

    def _failed(self, what: str, request_id: str, exc: Exception) -> None:
        if isinstance(exc, LMCacheError):
            logger.warning("%s of request %s failed: %s", what, request_id, exc)
            if isinstance(exc, ServerUnavailableError):
                self.link.mark_down(exc)
        else:
            logger.error("%s of request %s failed", what, request_id, exc_info=exc)

    # ----- completion ------------------------------------------------------------------------

    def take_events(self) -> list[object]:
        """Finished stores' events since the last call, then the removals the server's
        KV event log told of, if a poll was due (empty when vLLM's events are off)."""
        if self.events is None:
            return []
        events: list[object] = list(self.events.take())
        if self.removals is not None and self.link.healthy:
            events += self.removals.check()
        return events

    def load_errors(self) -> set[int]:
        self._end_layered_step()  # vLLM may ask before `wait_for_save` (deferred finalize)
        errors, self._load_errors = self._load_errors, set()
        return errors

    def wait_for_stores(self, timeout: float | None = None) -> bool:
        """Until every queued store is done (False: timed out); for tests and tools."""
        return self._stores.wait(timeout) if self._stores is not None else True

    def finished_stores(self) -> set[str]:
        """Finished requests whose stores are done: vLLM may free their blocks now."""
        return self._stores.done() if self._stores is not None else set()

    def shutdown(self) -> None:
        # Names first: the steps below may wait on a server that is gone (its RPC timeout),
        # and vLLM SIGKILLs a worker that takes longer than its grace period; a segment left
        # named would hold this worker's whole KV cache in /dev/shm after it.
        self._reg.unlink_segments()
        if self._layered is not None:
            self._layered.close()
        if self._stores is not None:
            self._stores.close()  # before the link and the path they use
        self.link.close()
        self._reg.close()


def _tokens(staged: Sequence[tuple[LoadSpec, StagedLoad]]) -> int:
    """Tokens a step's staged loads copy."""
    return sum(spec.end - spec.start - spec.skip_tokens for spec, _ in staged)
