"""vLLM's KV cache groups (hybrid models: sliding-window beside full attention).

Under vLLM's hybrid KV cache manager, a model whose layers differ (Gemma-style sliding-
window and full attention layers) has several *KV cache groups*: each has its own block
table, and a sliding-window group keeps only the blocks inside its window; the blocks
before it become vLLM's null block (id 0) in the request's table.

Each group is cached as if it were its own engine: its layers are one registration (one
layout), its keys live in its own namespace (``kv_spec`` + ``group=g/n``, and the window),
and every load and store names its group and carries that group's block ids. Lookups ask
the *primary* group only (the first full-attention one: it holds every token); a load
of another group whose chunks are gone fails, vLLM recomputes the request (asynchronous
loads, `worker_groups.py`) and its stores put them back.

Null blocks are never copied: a store starts at the first chunk after them (a window
group stores what it still holds), a load skips them (vLLM will not read them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from lmcache.integration.vllm.identity import CacheIdentity

NULL_BLOCK = 0  # vLLM's null block (BlockPool reserves block 0): "not held"


@dataclass(frozen=True)
class KVGroup:
    index: int
    layer_names: tuple[str, ...]
    sliding_window: int | None = None  # tokens; None: full attention


# vLLM's KV cache specs that hold every block, and the one that keeps a window of them
_FULL = frozenset({"FullAttentionSpec", "MLAAttentionSpec"})
_WINDOW = frozenset({"SlidingWindowSpec"})


def kv_groups(kv_cache_config: Any) -> list[KVGroup]:
    """The KV cache groups of vLLM's ``KVCacheConfig`` (empty without one).
    NotImplementedError for a hybrid model with a group of another kind (Mamba state,
    chunked local attention, ...): its blocks are not token KV that chunks can hold."""
    groups = getattr(kv_cache_config, "kv_cache_groups", None) or []
    out = []
    for i, group in enumerate(groups):
        spec = group.kv_cache_spec
        kind = type(spec).__name__
        if len(groups) > 1 and kind not in _FULL | _WINDOW:
            raise NotImplementedError(
                f"KV cache group {i} is a {kind}: LMCache caches full and sliding-window "
                "attention groups only"
            )
        window = int(spec.sliding_window) if kind in _WINDOW else None
        out.append(KVGroup(i, tuple(group.layer_names), window))
    return out


def primary_group(groups: Sequence[KVGroup]) -> int:
    """The group lookups ask: the first that keeps every block (full attention)."""
    return next((g.index for g in groups if g.sliding_window is None), 0)


def group_identity(identity: CacheIdentity, group: KVGroup, count: int) -> CacheIdentity:
    """The identity of one group's cache; a model with one group keeps its own."""
    if count <= 1:
        return identity
    spec = f"{identity.kv_spec};group={group.index}/{count}"
    if group.sliding_window is not None:
        spec += f";window={group.sliding_window}"
    return replace(identity, kv_spec=spec)


def held_store(
    start: int, end: int, block_ids: list[int], block_size: int, chunk: int
) -> tuple[int, list[int]] | None:
    """The part of a store of ``[start, end)`` (``block_ids`` from ``start``) that vLLM
    still holds: from the first chunk past its last null block (None: nothing)."""
    nulls = _leading_nulls(block_ids)
    if not nulls:
        return start, block_ids
    first = -(-(start + nulls * block_size) // chunk) * chunk
    if first >= end:
        return None
    return first, block_ids[(first - start) // block_size :]


def held_load(
    start: int, end: int, block_ids: list[int], skip: int, *, bs: int, chunk: int
) -> tuple[int, list[int], int] | None:
    """A load of ``[start, end)`` into ``block_ids`` skipping ``skip`` tokens, narrowed to
    the blocks vLLM holds: (start, block ids, skip), or None if it holds none of them."""
    first = start + max(skip, _leading_nulls(block_ids) * bs)
    if first >= end:
        return None
    new_start = first // chunk * chunk
    return new_start, block_ids[(new_start - start) // bs :], first - new_start


def _leading_nulls(block_ids: list[int]) -> int:
    """Blocks up to and including the last null one (a window's skipped blocks lead)."""
    for i in range(len(block_ids) - 1, -1, -1):
        if block_ids[i] == NULL_BLOCK:
            return i + 1
    return 0
