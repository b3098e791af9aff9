"""What makes two engines' KV bytes interchangeable, derived from the vLLM config.

The scheduler (lookups) and every worker (stores, retrieves) compute the same
identity, so their keys agree; anything that changes the bytes of a block goes
into ``kv_spec`` and keeps incompatible caches apart.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vllm.config import VllmConfig


@dataclass(frozen=True)
class CacheIdentity:
    model_name: str
    world_size: int
    dtype: str
    kv_spec: str
    block_size: int


@cache
def cpu_isa() -> str:
    """The CPU's vector ISA class: vLLM's CPU attention packs K blocks differently per ISA."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        flags = []
    for name in ("amx_bf16", "avx512f", "avx2"):
        if name in flags:
            return name
    return platform.machine() or "unknown"


def cache_identity(vllm_config: VllmConfig) -> CacheIdentity:
    mc, pc, cc = vllm_config.model_config, vllm_config.parallel_config, vllm_config.cache_config
    dtype = str(cc.cache_dtype)
    if dtype == "auto":
        dtype = str(mc.dtype).removeprefix("torch.")
    try:
        from vllm.platforms import current_platform

        device = str(current_platform.device_type)
    except Exception:  # pragma: no cover - vLLM without a platform
        device = "unknown"
    spec = ";".join(
        [
            "vllm",
            device,
            f"isa={cpu_isa() if device == 'cpu' else device}",
            f"block={cc.block_size}",
            f"kv_heads={mc.get_num_kv_heads(pc)}",
            f"head={mc.get_head_size()}",
            f"layers={mc.get_num_layers(pc)}",
        ]
    )
    return CacheIdentity(
        model_name=str(mc.model),
        world_size=pc.tensor_parallel_size * pc.pipeline_parallel_size,
        dtype=dtype,
        kv_spec=spec,
        block_size=int(cc.block_size),
    )
