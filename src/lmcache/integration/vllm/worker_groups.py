"""The workers of a hybrid model: one `WorkerSide` per KV cache group (`kv_groups.py`).

Each group's layers are registered as their own engine (own layout, own "GPU ID", own
keys); vLLM's calls are fanned out by group (loads and stores name theirs) or by layer
(`wait_for_layer`). The groups' layers share vLLM's KV tensors (a block id belongs to one
group at a time), so in engine_driven mode the tensors move to shared memory once, and
each group registers the segments its layers use.

Why a sliding-window group stores inside the step (not on the store thread): vLLM frees
the blocks that leave a request's window while the request runs, and may hand them to
another request in the very next step; only a finished request's blocks are kept for a
running store (`store_queue.py`).

A finished request's stores are done when every group's are; a request whose load failed
in any group stores nothing of this step in any group (its later KV was computed over
blocks without valid KV).

Loads are asynchronous in vLLM's sense (the scheduler says so, `async_loads`): vLLM cannot
map failed block ids back to requests when a model has several KV cache groups (it stops
with "A KV connector reported block-level load failures (invalid_block_ids) which is not
supported for models with multiple KV cache groups"), so a load is copied whole in
`start_load` (never layer by layer: its request is not in the step's forward pass) and
reported as a finished receive, a failed one also as a failed receive (vLLM then
recomputes the request); never as load errors.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from lmcache.integration.vllm.kv_groups import KVGroup, primary_group
from lmcache.integration.vllm.metadata import Metadata
from lmcache.integration.vllm.stats import merged
from lmcache.integration.vllm.worker import WorkerSide

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("lmcache.integration")

MAX_PENDING_FINISHED = 65536  # finished requests some group has not reported yet


class _MergedStats:
    def __init__(self, workers: Sequence[WorkerSide]) -> None:
        self._workers = workers

    def take(self) -> dict[str, float] | None:
        parts = [d for d in (w.stats.take() for w in self._workers) if d]
        if not parts:
            return None
        out = parts[0]
        for d in parts[1:]:
            out = merged(out, d)
        return out


class GroupedWorkers:
    def __init__(self, workers: Sequence[WorkerSide], groups: Sequence[KVGroup]) -> None:
        self.workers = list(workers)
        self.groups = list(groups)
        self.primary = self.workers[primary_group(groups)]
        for w in self.workers:
            w.counts_tokens = w is self.primary
        self._by_layer = {
            name: w
            for w, g in zip(self.workers, self.groups, strict=True)
            for name in g.layer_names
        }
        self._pending: Counter[str] = Counter()
        self._recv_done: set[str] = set()  # loads ended (emptied every step by vLLM)
        self._recv_failed: set[str] = set()
        self.stats = _MergedStats(self.workers)

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from lmcache.integration.vllm import kv_memory

        first = self.workers[0]
        bs = first.identity.block_size
        logger.info("Registering kv caches! (%d KV cache groups)", len(self.groups))
        segments = []
        if first.mode == "engine_driven":  # every group's tensors, moved once
            segments = kv_memory.migrate_to_shm(kv_memory.describe(kv_caches, bs))
        for worker, group in zip(self.workers, self.groups, strict=True):
            names = [n for n in group.layer_names if n in kv_caches]
            view = kv_memory.describe({n: kv_caches[n] for n in names}, bs)
            worker.register_memory(
                view.layout, view.arrays(), kv_memory.segments_of(view, segments), names
            )

    def handle_preemptions(self, meta: Metadata) -> None:
        for w in self.workers:
            w.handle_preemptions(meta)

    def start_load(self, meta: Metadata) -> None:
        for i, w in enumerate(self.workers):
            loads = [spec for spec in meta.loads if spec.group == i]
            if loads:
                w.start_load(replace(meta, loads=loads, stores=[]))
        requests = {spec.request_id for spec in meta.loads}
        for w in self.workers:
            self._recv_failed |= w.step_failures() & requests
            w.load_errors()  # reported as failed receives instead (module docstring)
        self._recv_done |= requests

    def finished_loads(self) -> tuple[set[str], set[str]]:
        """Requests whose loads ended since the last call, and those of them that failed."""
        done, failed = self._recv_done, self._recv_failed
        self._recv_done, self._recv_failed = set(), set()
        return done, failed

    def wait_for_layer(self, layer_name: str) -> None:
        worker = self._by_layer.get(layer_name)
        if worker is not None:
            worker.wait_for_layer(layer_name)

    def save(self, meta: Metadata) -> None:
        failed: set[str] = set()
        for w in self.workers:
            failed |= w.step_failures()
        for i, w in enumerate(self.workers):
            stores = [spec for spec in meta.stores if spec.group == i]
            w.save(replace(meta, loads=[], stores=stores), failed)

    def finished_stores(self) -> set[str]:
        """Finished requests whose stores are done in every group that stores on its
        thread (a window group's stores end inside the step)."""
        queued = [w for w in self.workers if w.stores_async]
        done = set()
        for w in queued:
            for rid in w.finished_stores():
                self._pending[rid] += 1
                if self._pending[rid] >= len(queued):
                    del self._pending[rid]
                    done.add(rid)
        while len(self._pending) > MAX_PENDING_FINISHED:  # bounded (never expected)
            self._pending.pop(next(iter(self._pending)))
        return done

    def load_errors(self) -> set[int]:
        """None: failed loads are failed receives here (`finished_loads`)."""
        for w in self.workers:
            w.load_errors()
        return set()

    def take_events(self) -> list[object]:
        return self.primary.take_events()

    def shutdown(self) -> None:
        for w in self.workers:
            w.shutdown()
