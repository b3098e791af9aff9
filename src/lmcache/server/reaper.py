"""Dead and silent engines: what the server forgets, and the shared memory it removes.

Every second the runtime asks `EngineReaper.reap`::

    engine's pid gone (or a zombie)  ->  unregister, unmap, drop its prepared transfers,
                                         end its lookup sessions, unlink its KV segments
    engine silent for idle_s         ->  unregister, unmap; its segments are remembered
                                         (pid -> names) and unlinked once the pid is gone

A segment is unlinked only when nobody holds its lock (`storage/shm_names.py`); one still
held (a killed process's last threads may still be closing its files) is tried again at
the next reap, then less and less often (1, 2, 4 ... 64 s: a descriptor inherited by a
living child may hold it for good). Both tables are bounded.

At shutdown, `sweep_at_exit` removes the segments of engines whose process is gone or
going: vLLM's default shutdown (--shutdown-timeout 0) SIGKILLs its workers, and a server
stopped right after vLLM (compose down, a test's teardown) would otherwise never reap them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from lmcache.server.registry import EngineRegistry, pid_alive, pid_exiting
from lmcache.server.sessions import Sessions
from lmcache.server.worker_copy import PreparedTransfers
from lmcache.storage.shm_names import unlink_if_stale

# Processes whose segments wait for their end (the oldest entry goes first when full).
MAX_FORGOTTEN_PIDS = 1024
MAX_FORGOTTEN_NAMES = 256
MAX_RETRY_INTERVAL_S = 64.0
EXIT_SWEEP_S = 1.0  # how long a stopping server waits for engines that are still dying


@dataclass
class _Pending:
    """Segments of process ``pid`` to remove once it is gone and nobody holds them."""

    names: list[str]
    next_try: float = 0.0  # time.monotonic(); 0: at the first reap that finds the pid gone
    interval_s: float = 1.0


class EngineReaper:
    def __init__(
        self, registry: EngineRegistry, sessions: Sessions, prepared: PreparedTransfers
    ) -> None:
        self.registry = registry
        self.sessions = sessions
        self.prepared = prepared
        self._forgotten_segments: dict[int, _Pending] = {}  # pid -> its segments

    def reap(self, idle_s: float) -> list[str]:
        """Forget engines whose process is gone (the kernel told us its pid when it
        connected) or that were silent for ``idle_s`` seconds (0: never): their
        registrations, mappings, prepared transfers and lookup locks. Returns log lines."""
        lines = []
        pids = {e.pid for e in self.registry.engines() if e.pid}
        pids |= self.sessions.pids() | set(self._forgotten_segments)
        dead = {p for p in pids if not pid_alive(p)}
        for engine in self.registry.engines():
            dead_now = engine.pid in dead
            if dead_now:
                why = f"its process {engine.pid} is gone"
            elif idle_s and time.monotonic() - engine.last_seen > idle_s:
                why = f"silent for {idle_s:g} s (--engine-timeout-s)"
            else:
                continue
            if not self.registry.unregister(engine.instance_id, engine):
                continue
            dropped = self.prepared.drop_engine(engine.instance_id) if dead_now else 0
            # A dead engine's KV segments stay in /dev/shm (they hold its whole KV cache)
            # unless we remove them: only those nobody holds any more (see storage/shm_names.py).
            # A silent one still holds them: they are removed once its process is gone.
            names = engine.segment_names()
            removed = self._remove_segments(engine.pid, names) if dead_now else []
            if names and not dead_now and engine.pid:
                self._forget_later(engine.pid, names)
            lines.append(
                f"Unregistered GPU ID {engine.instance_id}: {why}; released {dropped} "
                "prepared transfers and unmapped its memory"
                + (f"; removed its segments {', '.join(removed)}" if removed else "")
            )
        now = time.monotonic()
        for pid in dead & set(self._forgotten_segments):
            pending = self._forgotten_segments[pid]
            if now < pending.next_try:
                continue
            del self._forgotten_segments[pid]
            removed = self._remove_segments(pid, pending.names, pending)
            if removed:
                lines.append(
                    f"Removed the segments {', '.join(removed)} of process {pid} (gone now; "
                    "its engine was forgotten earlier, or they were still held then)"
                )
        if dead:
            ended = self.sessions.end_pids(dead)
            if ended:
                lines.append(f"Released the lookup locks of {ended} requests of dead processes")
        return lines

    def _remove_segments(
        self, pid: int | None, names: list[str], tried: _Pending | None = None
    ) -> list[str]:
        """Unlink the segments of a dead process that nobody holds; those still held are
        tried again later (a killed process's last threads may still be closing its files):
        at the next reap, then backing off after each failed try. Returns the names removed."""
        removed, held = _unlink_unheld(names)
        if held and pid:
            pending = self._forget_later(pid, held)
            if tried is not None:  # held at a retry too: back off
                pending.interval_s = min(tried.interval_s * 2, MAX_RETRY_INTERVAL_S)
                pending.next_try = time.monotonic() + tried.interval_s
        return removed

    def _forget_later(self, pid: int, names: list[str]) -> _Pending:
        """Remember segments to remove once process ``pid`` is gone (an engine unregistered
        while alive, or a dead one's segments still held); bounded: the oldest entry goes."""
        self._forgotten_segments.pop(pid, None)
        while len(self._forgotten_segments) >= MAX_FORGOTTEN_PIDS:
            del self._forgotten_segments[next(iter(self._forgotten_segments))]
        pending = _Pending(names[:MAX_FORGOTTEN_NAMES])
        self._forgotten_segments[pid] = pending
        return pending

    def sweep_at_exit(self, wait_s: float = EXIT_SWEEP_S) -> list[str]:
        """Remove the segments of registered and remembered engines whose process is gone;
        one that is exiting (killed, still tearing its memory down before it closes its
        files) is waited for up to ``wait_s``. A live engine keeps its memory, at once.
        Returns log lines."""
        pending: dict[int, set[str]] = {
            p: set(f.names) for p, f in self._forgotten_segments.items()
        }
        for engine in self.registry.engines():
            if engine.pid:
                pending.setdefault(engine.pid, set()).update(engine.segment_names())
        removed: list[str] = []
        deadline = time.monotonic() + wait_s
        while True:
            for pid in [p for p in pending if pid_alive(p) and not pid_exiting(p)]:
                del pending[pid]
            for pid in [p for p in pending if not pid_alive(p)]:
                gone, held = _unlink_unheld(sorted(pending[pid]))
                removed += gone
                if held:
                    pending[pid] = set(held)
                else:
                    del pending[pid]
            if not pending or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        if not removed:
            return []
        return [f"Removed the segments {', '.join(removed)} of engines whose processes are gone"]


def _unlink_unheld(names: list[str]) -> tuple[list[str], list[str]]:
    """Unlink the segments nobody holds: (removed, still held); others (gone, not ours) drop."""
    removed, held = [], []
    for name in names:
        outcome = unlink_if_stale(name)
        if outcome == "removed":
            removed.append(name)
        elif outcome == "live":
            held.append(name)
    return removed, held
