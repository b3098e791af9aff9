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
