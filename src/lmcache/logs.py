"""Logging setup: every line starts with ``LMCache <LEVEL>: `` so operators can grep it.

Every line also passes a `LogGuard` (installed by `setup_logging` and `ensure_logging`):

- credentials are masked (`lmcache.redact.mask_text`): a URL with a password, a
  ``password=...`` or a bearer token never reaches the log, nor does one in a traceback;
- a line repeated more than `REPEAT_LIMIT` times within `REPEAT_WINDOW_S` (same logger,
  level and message template) is dropped, and when the window rolls over one WARNING
  says ``suppressed K repeats of: <template>``, so a flood of bad requests cannot fill a
  disk with the same line.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import re
import sys
import threading
import time
from collections.abc import Callable

from lmcache.redact import mask_text

FORMAT = "LMCache %(levelname)s: %(message)s"

REPEAT_LIMIT = 20  # identical lines let through per window
REPEAT_WINDOW_S = 10.0
SUMMARY = "suppressed %d repeats of: %s"
_SWEEP_S = 1.0  # how often every window is checked for a roll-over
_MAX_KEYS = 4096  # distinct lines tracked at once; lines beyond are never suppressed
_TEMPLATE_CHARS = 200  # of a template quoted in the summary
_KEY_CHARS = 1024  # of a template kept as a key (an f-string line can be long)
# Only lines with one of these can hold a credential: the others skip the masking.
_SENSITIVE = re.compile(r"://|pass|pwd|token|secret|bearer|credential|api_?key", re.IGNORECASE)
_PLACEHOLDER = re.compile(
    r"%(?:\([^)]*\))?[-#0 +]*(?:\*|\d+)?(?:\.(?:\*|\d+))?[hlL]?[diouxXeEfFgGcrsa%]"
)
_IS_SUMMARY = "lmcache_log_guard_summary"  # set on the guard's own summary records
_FORMATTER = logging.Formatter(FORMAT)


@functools.lru_cache(maxsize=1024)
def _only_placeholders(template: str) -> bool:
    """``"%s"`` and the like: such a template says nothing, its lines differ by their args."""
    return not _PLACEHOLDER.sub("", template).strip()


class LogGuard(logging.Filter):
    """A filter that masks credentials and rate-limits repeated lines (module docstring).

    Attach it to a handler (`attach`): the summaries go to that handler. Attached to a
    logger instead, summaries go through the logger that logged the suppressed lines.
    `clock` is injectable for tests.
    """

    def __init__(
        self,
        limit: int = REPEAT_LIMIT,
        window_s: float = REPEAT_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.limit = limit
        self.window_s = window_s
        self._clock = clock
        # (logger name, level, template) -> [window start, lines seen, lines suppressed]
        self._windows: dict[tuple[str, int, str], list[float]] = {}
        self._lock = threading.Lock()
        self._next_sweep = -math.inf
        self._handler: logging.Handler | None = None

    def attach(self, handler: logging.Handler) -> None:
        handler.addFilter(self)
        self._handler = handler

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, _IS_SUMMARY, False):
            summaries, allowed = self._count(record)
            for key, suppressed in summaries:
                self._summarize(key, suppressed)
            if not allowed:
                return False
        _mask(record)
        return True

    def _count(
        self, record: logging.LogRecord
    ) -> tuple[list[tuple[tuple[str, int, str], int]], bool]:
        template = str(record.msg)
        if record.args and _only_placeholders(template):
            # A bad format is reported by the handler; it counts as its template then.
            with contextlib.suppress(Exception):
                template = record.getMessage()
        key = (record.name, record.levelno, template[:_KEY_CHARS])
        now = self._clock()
        summaries: list[tuple[tuple[str, int, str], int]] = []
        with self._lock:
            if now >= self._next_sweep:
                self._next_sweep = now + _SWEEP_S
                for old, (start, _, suppressed) in list(self._windows.items()):
                    if now - start >= self.window_s:
                        del self._windows[old]
                        if suppressed:
                            summaries.append((old, int(suppressed)))
            window = self._windows.get(key)
            if window is not None and now - window[0] >= self.window_s:
                del self._windows[key]
                if window[2]:
                    summaries.append((key, int(window[2])))
                window = None
            if window is None:
                if len(self._windows) >= _MAX_KEYS:
                    return summaries, True
                window = self._windows[key] = [now, 0, 0]
            window[1] += 1
            if window[1] <= self.limit:
                return summaries, True
            window[2] += 1
            return summaries, False

    def _summarize(self, key: tuple[str, int, str], suppressed: int) -> None:
        name, _, template = key
        if len(template) > _TEMPLATE_CHARS:
            template = template[:_TEMPLATE_CHARS] + "..."
        record = logging.LogRecord(
            name, logging.WARNING, __file__, 0, SUMMARY, (suppressed, template), None
        )
        setattr(record, _IS_SUMMARY, True)
        if self._handler is None:
            logging.getLogger(name).handle(record)
        elif record.levelno >= self._handler.level:
            self._handler.handle(record)


def _mask(record: logging.LogRecord) -> None:
    """Mask credentials in the record's message, traceback and stack, in place."""
    try:
        message = record.getMessage()
    except Exception:  # a bad format: the handler reports it (handleError)
        return
    if _SENSITIVE.search(message):
        masked = mask_text(message)
        if masked != message:
            record.msg, record.args = masked, None
    if record.exc_info and not record.exc_text:
        record.exc_text = _FORMATTER.formatException(record.exc_info)
    if record.exc_text and _SENSITIVE.search(record.exc_text):
        record.exc_text = mask_text(record.exc_text)
    if record.stack_info and _SENSITIVE.search(record.stack_info):
        record.stack_info = mask_text(record.stack_info)


def _handler() -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    LogGuard().attach(handler)
    return handler


def setup_logging(level: str = "INFO") -> None:
    """Route the ``lmcache`` logger (and uvicorn's) to stderr in the LMCache format."""
    handler = _handler()
    for name in ("lmcache", "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level.upper())
        logger.propagate = False


def ensure_logging() -> None:
    """Set up the format once in processes that did not call `setup_logging` (engines)."""
    logger = logging.getLogger("lmcache")
    if not logger.handlers:
        logger.addHandler(_handler())
        logger.setLevel(logging.INFO)
        logger.propagate = False
