"""What makes two engines' KV bytes interchangeable, derived from the vLLM config.

The scheduler (lookups) and every worker (stores, retrieves) compute the same
identity, so their keys agree; anything that changes the bytes of a block goes
into ``kv_spec`` and keeps incompatible caches apart.

MLA (DeepSeek-style latent attention) caches one latent per token that every tensor-
parallel rank holds whole: ``kv_spec`` then says `SHARED_KV`, keys leave the rank and
world size out, rank 0 alone stores and every rank loads the same chunks. Not under
pipeline or decode-context parallelism, where ranks hold different layers or tokens.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

from lmcache.storage.keys import SHARED_KV, shares_kv

if TYPE_CHECKING:
    from vllm.config import VllmConfig


@dataclass(frozen=True)
class CacheIdentity:
    model_name: str
    world_size: int
    dtype: str
    kv_spec: str
    block_size: int

    @property
    def shared_kv(self) -> bool:
        """Every rank holds the same KV (MLA): rank 0 stores, every rank loads."""
        return shares_kv(self.kv_spec)


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
    fields = [
        "vllm",
        device,
        f"isa={cpu_isa() if device == 'cpu' else device}",
        f"block={cc.block_size}",
        f"kv_heads={mc.get_num_kv_heads(pc)}",
        f"head={mc.get_head_size()}",
        f"layers={mc.get_num_layers(pc)}",
    ]
    if latent_kv_shared(
        bool(getattr(mc, "use_mla", False)),
        pc.pipeline_parallel_size,
        int(getattr(pc, "decode_context_parallel_size", 1) or 1),
    ):
        fields.append(SHARED_KV)
    spec = ";".join(fields)
    return CacheIdentity(
        model_name=str(mc.model),
        world_size=pc.tensor_parallel_size * pc.pipeline_parallel_size,
        dtype=dtype,
        kv_spec=spec,
        block_size=int(cc.block_size),
    )


def latent_kv_shared(use_mla: bool, pipeline_size: int, decode_context_size: int) -> bool:
    """Whether every rank caches the same bytes: MLA's latent is replicated across
    tensor-parallel ranks, but pipeline stages hold other layers and decode-context
    parallelism splits the tokens."""
    return use_mla and pipeline_size == 1 and decode_context_size == 1
