"""`RequestAllocationRecord`, imported by name by vLLM's built-in connector module."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestAllocationRecord:
    """Blocks newly allocated to a request in one step (block-allocation telemetry)."""

    req_id: str
    new_block_ids: list[int] = field(default_factory=list)
    new_token_ids: list[int] = field(default_factory=list)


BlockAllocationRecord = RequestAllocationRecord
