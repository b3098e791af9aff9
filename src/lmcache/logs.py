"""Logging setup: every line starts with ``LMCache <LEVEL>: `` so operators can grep it."""

from __future__ import annotations

import logging
import sys

FORMAT = "LMCache %(levelname)s: %(message)s"


def setup_logging(level: str = "INFO") -> None:
    """Route the ``lmcache`` logger (and uvicorn's) to stderr in the LMCache format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    for name in ("lmcache", "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level.upper())
        logger.propagate = False


def ensure_logging() -> None:
    """Set up the format once in processes that did not call `setup_logging` (engines)."""
    logger = logging.getLogger("lmcache")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
