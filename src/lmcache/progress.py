"""Progress lines for long operations (pre-faulting a large pool, indexing an fs L2 tier):
one line every `PROGRESS_EVERY_S` seconds, written by a thread of its own, so the
operation's loop only updates the counters its ``describe`` reads (never a log line per
step) and an operation shorter than the period logs nothing at all.

    with Progress(logger, lambda: f"indexing: {n[0]:,} objects") as p:
        for ...: n[0] += 1          # no logging here
    # every 5 s: "indexing: 41,000 objects (10 s)"; at the end, if it took 5 s or more:
    # "indexing: 80,000 objects: done in 17.3 s"
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from types import TracebackType

from lmcache import defaults


class Progress:
    """Logs ``describe()`` periodically while the ``with`` block runs (see module doc)."""

    def __init__(
        self, log: logging.Logger, describe: Callable[[], str], every_s: float | None = None
    ) -> None:
        self._log = log
        self._describe = describe
        self._every_s = defaults.PROGRESS_EVERY_S if every_s is None else every_s
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0

    def _line(self, suffix: str) -> None:
        try:
            text = self._describe()
        except Exception as exc:  # a progress line must never break the operation
            text = f"(progress unavailable: {type(exc).__name__})"
        self._log.info("%s%s", text, suffix)

    def _run(self) -> None:
        while not self._done.wait(self._every_s):
            self._line(f" ({time.monotonic() - self._t0:.0f} s)")

    def __enter__(self) -> Progress:
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="lmcache-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()
        took = time.monotonic() - self._t0
        if exc_type is None and took >= self._every_s:
            self._line(f": done in {took:.1f} s")
