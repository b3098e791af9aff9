"""`LMCacheMPConnector`: vLLM's KV connector for the LMCache server.

A thin shell over vLLM's `KVConnectorBase_V1`: vLLM builds one instance in the
scheduler process (role SCHEDULER) and one per worker (role WORKER); each
delegates to `SchedulerSide` or `WorkerSide`.

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "LMCacheMPConnector",
        "kv_role": "kv_both", "kv_connector_extra_config": {"lmcache.mp.port": 5555}}'

``kv_role``: ``kv_both`` loads and stores, ``kv_producer`` only stores,
``kv_consumer`` only loads.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from lmcache.integration.vllm.config import ConnectorConfig
from lmcache.integration.vllm.identity import cache_identity
from lmcache.integration.vllm.link import ServerLink
from lmcache.integration.vllm.metadata import Metadata, ParallelStrategy
from lmcache.integration.vllm.scheduler import SchedulerSide
from lmcache.integration.vllm.worker import WorkerSide
from lmcache.logs import ensure_logging

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("lmcache.integration")


class LMCacheMPConnector(KVConnectorBase_V1):  # type: ignore[misc]
    def __init__(self, vllm_config: Any, role: Any, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        ensure_logging()
        transfer = vllm_config.kv_transfer_config
        config = ConnectorConfig.from_extra_config(
            transfer.kv_connector_extra_config, log=role == KVConnectorRole.WORKER
        )
        identity = cache_identity(vllm_config)
        can_store = transfer.kv_role in ("kv_both", "kv_producer")
        can_load = transfer.kv_role in ("kv_both", "kv_consumer")
        self._scheduler: SchedulerSide | None = None
        self._worker: WorkerSide | None = None
        if role == KVConnectorRole.SCHEDULER:
            _prefer_recompute(transfer)
            link = ServerLink(config)
            self._scheduler = SchedulerSide(link, identity, can_load=can_load, can_store=can_store)
            logger.info(
                "LMCache connector (scheduler) connected to %s, chunk size %d",
                link.endpoint, link.chunk_size,
            )  # fmt: skip
        else:
            link = ServerLink(config)
            self._worker = WorkerSide(
                link, identity, _parallel(vllm_config), config.transfer_mode,
                can_load=can_load, can_store=can_store,
            )  # fmt: skip

    # ----- worker side ----------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        assert self._worker is not None
        self._worker.register_kv_caches(kv_caches)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if self._worker is not None and isinstance(meta, Metadata) and meta.loads:
            self._worker.start_load(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None

    def save_kv_layer(
        self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any
    ) -> None:
        return None

    def wait_for_save(self) -> None:
        meta = self._get_connector_metadata()
        if self._worker is not None and isinstance(meta, Metadata):
            self._worker.save(meta)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return None, None  # loads finish inside the step that needs them (sync); stores too

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.load_errors() if self._worker is not None else set()

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()
        if self._scheduler is not None:
            self._scheduler.link.close()

    # ----- scheduler side ----------------------------------------------------------------

    def get_num_new_matched_tokens(
        self, request: Any, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        assert self._scheduler is not None
        return self._scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        assert self._scheduler is not None
        self._scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        assert self._scheduler is not None
        return self._scheduler.build_connector_meta(scheduler_output)

    def request_finished(
        self, request: Any, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        if self._scheduler is not None:
            try:
                self._scheduler.request_finished(request)
            except Exception:
                logger.exception("ending the session of request %s failed", request.request_id)
        # Stores finish inside the step that issued them, so blocks can be freed at once.
        return False, None

    def reset_cache(self) -> bool:
        return self._scheduler.reset_cache() if self._scheduler is not None else False


def _parallel(vllm_config: Any) -> ParallelStrategy:
    pc = vllm_config.parallel_config
    world = pc.tensor_parallel_size * pc.pipeline_parallel_size
    rank = 0
    if world > 1:
        try:
            from vllm.distributed.parallel_state import get_pp_group, get_tp_group

            rank = (
                get_pp_group().rank_in_group * pc.tensor_parallel_size
                + get_tp_group().rank_in_group
            )
        except Exception:  # pragma: no cover - single-process engines
            rank = 0
    return ParallelStrategy(world_size=world, rank=rank)


def _prefer_recompute(transfer: Any) -> None:
    """A failed load (server gone mid-request) must mean "recompute", not a failed request."""
    if getattr(transfer, "kv_load_failure_policy", "recompute") == "fail":
        try:
            transfer.kv_load_failure_policy = "recompute"
            logger.info("kv_load_failure_policy = recompute (a failed load is recomputed)")
        except Exception:  # frozen config: keep the user's setting
            logger.warning("kv_load_failure_policy is 'fail': a failed load fails its request")
