"""Stores off the critical path: the step hands its stores to one thread and goes on.

    step N   forward ─> wait_for_save: submit(stores) ──> store thread: path.store(spec) ...
    step N+1 handle_preemptions: a request was preempted ─> wait() (its blocks may be
             reused by this very step's forward)
    request finishes ─> scheduler delays freeing its blocks (`request_finished` -> True)
             ─> finish(ids) ─> get_finished reports each id once its stores are done

Why this is safe without copying the blocks first: a store reads blocks of tokens that are
already computed, and vLLM writes a block again only after freeing it. Blocks are freed in
three ways, and each waits for the stores that read them: a finished (or aborted) request's
blocks stay allocated until `done` reports it; a preempted request's blocks are freed when the
next step is scheduled, before its forward, and `wait` runs in `handle_preemptions`, before
that forward; a failed load never feeds a store (`WorkerSide` drops the request's stores).

One thread, in order: stores of one request arrive in token order, and on a 2-core host a
second copy thread would only compete with the forward pass for the same cores. It stays on
the worker's CPUs, beside the forward pass: moved to the CPU that vLLM keeps free (as the
layered-load thread is) it measured no better, and there it would hold the GIL on a CPU that
also runs vLLM's engine core and API server, which the forward pass then waits for (README,
"When copies run").
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence

from lmcache.integration.vllm.metadata import StoreSpec

logger = logging.getLogger("lmcache.integration")


class StoreQueue:
    """A FIFO of stores run by one daemon thread; ``run`` must not raise (it is the worker's
    store-and-log routine), but an exception is logged and never stops the thread."""

    def __init__(self, run: Callable[[StoreSpec], None]) -> None:
        self._run = run
        self._jobs: deque[StoreSpec] = deque()
        self._pending: Counter[str] = Counter()  # request id -> stores not done yet
        self._finishing: set[str] = set()  # finished requests whose blocks wait for us
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="lmcache-store", daemon=True)
        self._thread.start()

    def submit(self, specs: Sequence[StoreSpec]) -> None:
        with self._cond:
            if self._closed:
                return
            self._jobs.extend(specs)
            self._pending.update(s.request_id for s in specs)
            self._cond.notify_all()

    def finish(self, request_ids: Iterable[str]) -> None:
        """These requests finished and vLLM keeps their blocks until `done` reports them."""
        with self._cond:
            self._finishing.update(request_ids)

    def done(self) -> set[str]:
        """Finished requests whose stores are all done (each reported once)."""
        with self._cond:
            ready = {r for r in self._finishing if not self._pending[r]}
            self._finishing -= ready
            return ready

    def wait(self, timeout: float | None = None) -> bool:
        """Until every store submitted so far is done (False: timed out)."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._jobs and not self._busy, timeout)

    @property
    def in_flight(self) -> int:
        with self._cond:
            return len(self._jobs) + self._busy

    def close(self, timeout: float = 10.0) -> None:
        """Run what is queued (the blocks are still ours until shutdown), then stop."""
        self.wait(timeout)
        with self._cond:
            self._closed = True
            self._jobs.clear()
            self._cond.notify_all()
        self._thread.join(timeout=timeout)

    # ----- the store thread ------------------------------------------------------------

    _busy = 0  # 1 while the thread runs a job (read under the condition's lock)

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._jobs or self._closed)
                if self._closed:
                    return
                spec = self._jobs.popleft()
                self._busy = 1
            try:
                self._run(spec)
            except Exception:
                logger.exception("store of request %s failed", spec.request_id)
            finally:
                with self._cond:
                    self._busy = 0
                    rid = spec.request_id
                    self._pending[rid] -= 1
                    if not self._pending[rid]:
                        del self._pending[rid]  # bounded by the stores in flight
                    self._cond.notify_all()
