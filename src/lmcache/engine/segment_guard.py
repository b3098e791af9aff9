"""A guard process that removes an engine's KV segments when the engine dies without doing so.

vLLM's default shutdown (``--shutdown-timeout 0``) SIGKILLs its workers, so the connector's
own cleanup, which unlinks the worker's ``/lmcache_kv_*`` segments, never runs. A running
server removes them (its reaper, its exit sweep, its next start-up sweep), but with no
server running nothing would, and a segment holds the worker's whole KV cache. So the
worker starts a guard for the segments it created::

    vLLM worker ── holds flock(SH) on ──> /dev/shm/lmcache_kv_<pid>_<idx>
        │
        │ spawn through `sh -c '... &'`: the guard is re-parented and in a session of
        │ its own, so neither vLLM's kill_process_tree (which walks children) nor a
        │ process-group kill reaches it
        v
    guard ── flock(EX) on its own descriptor: the kernel wakes it once every holder
             is gone (unlinked and closed, or dead) ──> unlink the name, if it still
             leads to the file the worker created; exit

Liveness is the lock of `lmcache.storage.shm_names`, never a pid: a normal shutdown
unlinks first, and the guard then finds the name gone and just exits. The guard imports
nothing of lmcache but `shm_names`, holds one descriptor per segment while it waits
(which keeps no memory alive that the name does not), and never outlives the worker by
more than its own wake-up.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from lmcache.storage.shm_names import shm_path, unlink_when_released

logger = logging.getLogger("lmcache.engine")

# argv of one guarded segment: its name, then the (st_dev, st_ino) of the creator's file
_FIELDS = 3


def guard_segments(segments: Sequence[tuple[str, int]]) -> int | None:
    """Start a guard for ``(name, fd)`` pairs of segments this process created and holds;
    its pid, or None when it could not start (logged: the segments are then left to a
    server's sweeps, as before)."""
    argv: list[str] = []
    for name, fd in segments:
        st = os.fstat(fd)
        argv += [name, str(st.st_dev), str(st.st_ino)]
    if not argv:
        return None
    guard = [sys.executable, "-m", __name__, *argv]
    # The guard imports lmcache from where this process found it (a plugin path too).
    here = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
    try:
        # `sh` prints the guard's pid and exits at once: the guard's parent is gone before
        # vLLM could ever look for its children.
        launched = subprocess.run(
            ["/bin/sh", "-c", '"$@" </dev/null >/dev/null & echo $!', "lmcache-guard", *guard],
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": path},
            start_new_session=True,
            check=True,
            timeout=10,
        )
        return int(launched.stdout)
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        logger.warning(
            "could not start the guard of KV segments %s (%s): if this process is killed, "
            "they stay until an LMCache server starts",
            ", ".join(name for name, _ in segments), exc,
        )  # fmt: skip
        return None


def main(argv: Sequence[str]) -> int:
    """Wait for each segment's holders to go, then remove the ones still unlinked."""
    if not argv or len(argv) % _FIELDS:
        print("usage: python -m lmcache.engine.segment_guard (NAME DEV INO)...", file=sys.stderr)
        return 2
    for i in range(0, len(argv), _FIELDS):
        name, dev, ino = argv[i : i + _FIELDS]
        if unlink_when_released(shm_path(name), (int(dev), int(ino))):
            _say(f"removed KV segment /{name.lstrip('/')}: its engine exited without removing it")
    return 0


def _say(line: str) -> None:
    """One line on the stderr we inherited (vLLM's, which may be gone by now)."""
    with contextlib.suppress(OSError):
        print(f"LMCache INFO: {line}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
