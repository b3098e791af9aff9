"""Loads pipelined by layer: layer ``i + 1`` is copied while vLLM computes layer ``i``.

    start_load_kv   stage every load (its RPC) ─> copy thread: layer 0 ─ 1 ─ ... ─ L-1 ─> finish
    forward pass                        wait(0) attn 0 ─ wait(1) attn 1 ─ ... ─ wait(L-1) attn L-1
    wait_for_save   end_step: all layers copied and finished; which loads failed; did the
                    forward pass wait for every layer?

vLLM calls `wait_for_layer_load` before each attention layer reads its KV cache (the
``maybe_transfer_kv_layer`` wrapper around the attention op; vLLM 0.32's CPU build included).
A layer's copy only has to be done by then. The blocks a load writes hold tokens before
the request's computed tokens, which this step's forward pass only reads; the tokens it
computes go to the blocks after them, so the copy thread and the forward pass never write
the same bytes.

Layered loads are used only once a whole forward pass was seen to wait for every registered
layer (`ready`): a model whose attention does not go through that wrapper (or a pass that
skips a layer) would read blocks the thread may still be writing. Should a step's forward
pass ever skip a layer after that, its layered loads are reported as failed (vLLM recomputes
their blocks: the bytes it read may have been half copied) and loads stay synchronous from
then on.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from lmcache.integration.vllm.transfer_paths import StagedLoad

logger = logging.getLogger("lmcache.integration")

Job = TypeVar("Job")  # what the caller knows a load by (the worker: its LoadSpec)


class LayeredLoads(Generic[Job]):
    """One copy thread that runs each step's staged loads layer by layer.

    ``on_error(job, exc)`` is told of each load that failed (its copy or its finish); it
    must not raise. `end_step` returns the failed jobs of the step.
    """

    def __init__(
        self,
        layer_names: Sequence[str],
        on_error: Callable[[Job, Exception], None],
        place: Callable[[], None] | None = None,
    ) -> None:
        self._place = place  # run first on the copy thread (the worker: spare CPUs)
        self._index = {name: i for i, name in enumerate(layer_names)}
        self._layers = len(layer_names)
        self._on_error = on_error
        self._cond = threading.Condition()
        self._jobs: list[tuple[Job, StagedLoad]] = []
        self._failed: list[Job] = []
        self._copied = self._layers  # layers done in the running step (all: none running)
        self._running = False  # a step's loads are with the thread (until `end_step`)
        self._busy = False  # the thread is copying or finishing
        self._waited: set[int] = set()  # layers the current forward pass waited for
        self._closed = False
        self.verified = False  # a forward pass waited for every layer
        self.disabled = False  # a forward pass skipped a layer: synchronous for good
        self._thread: threading.Thread | None = None

    @property
    def ready(self) -> bool:
        """Whether this step's loads may be layered."""
        return self.verified and not self.disabled and not self._closed

    def begin(self, jobs: list[tuple[Job, StagedLoad]]) -> None:
        """Hand the step's staged loads to the copy thread (before the forward pass)."""
        if not jobs:
            return
        with self._cond:
            if self._running:
                raise RuntimeError("a step's layered loads began before the last one ended")
            self._jobs, self._failed = jobs, []
            self._copied, self._running, self._busy = 0, True, True
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name="lmcache-layered-load", daemon=True
                )
                self._thread.start()
            self._cond.notify_all()

    def wait(self, layer_name: str) -> None:
        """Until ``layer_name``'s KV is copied for every load of this step."""
        index = self._index.get(layer_name)
        if index is None:
            return
        self._waited.add(index)
        if self._copied > index:  # no lock on the common path (no load, or done already)
            return
        with self._cond:
            while self._copied <= index:
                self._cond.wait()

    def end_step(self) -> list[Job]:
        """After the forward pass: wait until the step's loads are finished; the jobs that
        failed. Checks (and for the first pass, learns) that every layer was waited for."""
        waited, self._waited = self._waited, set()
        every_layer = len(waited) == self._layers
        with self._cond:
            while self._busy:
                self._cond.wait()
            jobs, failed = self._jobs, self._failed
            self._jobs, self._failed, self._running = [], [], False
        if not jobs:
            if every_layer and not self.verified:
                self.verified = True
                logger.info(
                    "vLLM waits for each of its %d KV layers: loads this worker copies now run "
                    "layer by layer beside the forward pass", self._layers,
                )  # fmt: skip
            return failed
        if not every_layer:
            self.disabled = True
            logger.warning(
                "vLLM's forward pass did not wait for every KV layer (%d of %d): this step's "
                "%d loads are recomputed, and loads are synchronous from now on",
                len(waited), self._layers, len(jobs),
            )  # fmt: skip
            seen = {id(j) for j in failed}
            failed = failed + [j for j, _ in jobs if id(j) not in seen]
        return failed

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    # ----- the copy thread ----------------------------------------------------------------

    def _loop(self) -> None:
        if self._place is not None:
            try:
                self._place()
            except Exception:
                logger.exception("placing the layered-load thread failed")
        while True:
            with self._cond:
                while not self._closed and not (self._busy and self._copied == 0):
                    self._cond.wait()
                if self._closed:
                    self._copied = self._layers
                    self._busy = False
                    self._cond.notify_all()
                    return
                jobs = list(self._jobs)
            bad: dict[int, Exception] = {}
            for layer in range(self._layers):
                for i, (_, load) in enumerate(jobs):
                    if i not in bad:
                        try:
                            load.copy_layers(range(layer, layer + 1))
                        except Exception as exc:  # reported, never raised into vLLM
                            bad[i] = exc
                with self._cond:
                    self._copied = layer + 1
                    self._cond.notify_all()
            for i, (_, load) in enumerate(jobs):
                try:
                    load.finish(i not in bad)
                except Exception as exc:
                    bad.setdefault(i, exc)
            failed = [jobs[i][0] for i in sorted(bad)]
            for i in sorted(bad):
                self._on_error(jobs[i][0], bad[i])
            with self._cond:
                self._failed = failed
                self._busy = False
                self._cond.notify_all()
