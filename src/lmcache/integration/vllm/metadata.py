"""What the scheduler tells the workers each step (pickled by vLLM into SchedulerOutput).

scheduler step N                                   every worker, step N
build_connector_meta ─> Metadata{loads, stores,  ─> handle_preemptions: wait for stores
                          preempted,                 that read `preempted` requests' blocks
                          finished_stores}           start_load_kv: run `loads`
                                                     wait_for_save: queue `stores`; note
                                                     `finished_stores` for get_finished
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lmcache.integration.vllm.kv_events import StoredBlocks

try:  # the base class only exists where vLLM is installed
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata
except ImportError:  # pragma: no cover - unit tests without vLLM

    class KVConnectorMetadata:  # type: ignore[no-redef]
        pass


@dataclass(frozen=True)
class ParallelStrategy:
    """Which KV rank this worker is: keys are per rank, lookups cover all ranks."""

    world_size: int = 1
    rank: int = 0


@dataclass
class LoadSpec:
    """Copy cached chunks of tokens ``[start, end)`` into ``block_ids`` (one per block of
    the range), leaving the first ``skip_tokens`` alone (vLLM already has them)."""

    request_id: str
    tokens: list[int]
    start: int
    end: int
    block_ids: list[int]
    skip_tokens: int = 0
    cache_salt: str = ""
    group: int = 0  # the KV cache group whose blocks these are (`kv_groups`)


@dataclass
class StoreSpec:
    """Store the blocks of tokens ``[start, end)`` (whole chunks). ``event``: what to
    announce once it is stored (only when vLLM publishes KV events)."""

    request_id: str
    tokens: list[int]
    start: int
    end: int
    block_ids: list[int]
    cache_salt: str = ""
    event: StoredBlocks | None = None
    group: int = 0  # the KV cache group whose blocks these are (`kv_groups`)


@dataclass
class Metadata(KVConnectorMetadata):  # type: ignore[misc]
    loads: list[LoadSpec] = field(default_factory=list)
    stores: list[StoreSpec] = field(default_factory=list)
    # Requests preempted while this step was scheduled: their blocks may be reused now.
    preempted: list[str] = field(default_factory=list)
    # Finished requests whose blocks vLLM keeps until get_finished reports them (they had
    # stores, which may still be running).
    finished_stores: list[str] = field(default_factory=list)
