"""Small helpers shared across the package (and imported by vLLM, see integration/vllm)."""

from __future__ import annotations

import logging


def init_logger(name: str) -> logging.Logger:
    """A logger under the ``lmcache`` hierarchy, printing ``LMCache <LEVEL>: ...`` lines."""
    from lmcache.logs import ensure_logging

    ensure_logging()
    return logging.getLogger(name if name.startswith("lmcache") else f"lmcache.{name}")
