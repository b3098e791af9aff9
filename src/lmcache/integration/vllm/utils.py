"""Helpers that vLLM's built-in `LMCacheMPConnector` module imports by name."""

from __future__ import annotations

from typing import Any


def mla_enabled(model_config: Any) -> bool:
    """True when the model uses multi-head latent attention (one KV shared by TP ranks)."""
    return bool(getattr(model_config, "use_mla", False))
