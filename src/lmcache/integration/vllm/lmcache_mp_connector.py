"""`LMCacheMPConnector`: vLLM's KV connector for the LMCache server.

A thin shell over vLLM's `KVConnectorBase_V1`: vLLM builds one instance in the
scheduler process (role SCHEDULER) and one per worker (role WORKER); each
delegates to `SchedulerSide` or `WorkerSide`.

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "LMCacheMPConnector",
        "kv_role": "kv_both", "kv_connector_extra_config": {"lmcache.mp.port": 5555}}'

``kv_role``: ``kv_both`` loads and stores, ``kv_producer`` only stores,
``kv_consumer`` only loads.

What it reports to vLLM: stats (`get_kv_connector_stats` on both sides, built and summed
by the classmethods below; `stats.py`) and, when vLLM publishes KV events, the blocks its
stores put into LMCache (`get_kv_connector_kv_cache_events` on the workers,
`update_connector_output` and `take_events` on the scheduler; `kv_events.py`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
    SupportsHMA,
)

from lmcache.integration.vllm.config import LAYERED_MIN_TOKENS, ConnectorConfig
from lmcache.integration.vllm.cpus import spare_cpus
from lmcache.integration.vllm.identity import cache_identity
from lmcache.integration.vllm.kv_events import to_vllm
from lmcache.integration.vllm.kv_groups import (
    KVGroup,
    group_identity,
    kv_groups,
    primary_group,
)
from lmcache.integration.vllm.link import ServerLink, ServerLinkError, report_once
from lmcache.integration.vllm.metadata import Metadata, ParallelStrategy
from lmcache.integration.vllm.reporting import (
    LMCacheConnectorStats,
    LMCacheKVEvents,
    LMCachePromMetrics,
)
from lmcache.integration.vllm.scheduler import SchedulerSide
from lmcache.integration.vllm.worker import WorkerSide
from lmcache.integration.vllm.worker_groups import GroupedWorkers
from lmcache.logs import ensure_logging

if TYPE_CHECKING:  # vLLM's own types at the boundary, as its connector base names them
    import torch
    from vllm.config import VllmConfig
    from vllm.distributed.kv_events import KVCacheEvent
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = logging.getLogger("lmcache.integration")


class LMCacheMPConnector(KVConnectorBase_V1, SupportsHMA):  # type: ignore[misc]
    def __init__(
        self,
        vllm_config: VllmConfig,
        role: KVConnectorRole,
        kv_cache_config: KVCacheConfig | None = None,
    ) -> None:
        """One per process: SCHEDULER talks lookups and plans, WORKER moves blocks. A server
        that does not answer at start stops vLLM with one clear message (`_link`); one that
        goes away later only degrades the link, which reconnects."""
        super().__init__(vllm_config, role, kv_cache_config)
        ensure_logging()
        transfer = vllm_config.kv_transfer_config
        config = ConnectorConfig.from_extra_config(
            transfer.kv_connector_extra_config, log=role == KVConnectorRole.WORKER
        )
        base = cache_identity(vllm_config)
        # vLLM's hybrid KV cache manager: one group per kind of layer (`kv_groups.py`)
        groups = kv_groups(kv_cache_config) if kv_cache_config is not None else []
        count = len(groups)
        primary = primary_group(groups)
        identity = group_identity(base, groups[primary], count) if count > 1 else base
        can_store = transfer.kv_role in ("kv_both", "kv_producer")
        can_load = transfer.kv_role in ("kv_both", "kv_consumer")
        events_config = getattr(vllm_config, "kv_events_config", None)
        events = bool(events_config and events_config.enable_kv_cache_events)
        self._scheduler: SchedulerSide | None = None
        self._worker: WorkerSide | GroupedWorkers | None = None
        if role == KVConnectorRole.SCHEDULER:
            _prefer_recompute(transfer)
            link = _link(config, rank=0)
            self._scheduler = SchedulerSide(
                link, identity, can_load=can_load, can_store=can_store,
                async_store=config.async_store, events=events, primary=primary,
                window_groups={g.index: g.sliding_window for g in groups if g.sliding_window},
                async_loads=count > 1,
            )  # fmt: skip
            logger.info(
                "LMCache connector (scheduler) connected to %s, chunk size %d",
                link.endpoint, link.chunk_size,
            )  # fmt: skip
        else:
            parallel = _parallel(vllm_config)
            layered = _layered_min_tokens(config.layerwise_load)

            def worker(group: KVGroup | None) -> WorkerSide:
                window = group is not None and group.sliding_window is not None
                main = group is None or group.index == primary
                return WorkerSide(
                    _link(config, parallel.rank),
                    base if group is None else group_identity(base, group, count),
                    parallel, config.transfer_mode,
                    can_load=can_load, can_store=can_store,
                    async_store=config.async_store and not window,  # see worker_groups.py
                    copy_threads=config.copy_threads,
                    layerwise_load=count <= 1 and layered is not None,
                    layered_min_tokens=layered or 0,
                    events=events and main, event_poll_s=config.kv_event_poll_interval,
                    instance_id=None if group is None or main else _group_instance(group),
                )  # fmt: skip

            if count > 1:
                self._worker = GroupedWorkers([worker(g) for g in groups], groups)
            else:
                self._worker = worker(None)

    # ----- worker side ----------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Once, before the first step: describe (and, engine_driven, share) our KV memory."""
        assert self._worker is not None
        self._worker.register_kv_caches(kv_caches)

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        """Before the step touches a block: wait for stores reading preempted requests'
        blocks (free again, so this step may write them)."""
        if self._worker is not None and isinstance(kv_connector_metadata, Metadata):
            self._worker.handle_preemptions(kv_connector_metadata)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        """Before the forward: get every planned chunk within reach and copy it into its
        blocks, layer by layer beside the forward pass (or all at once, see worker.py); a
        load that fails marks its blocks for `get_block_ids_with_load_errors` (recompute)."""
        meta = self._get_connector_metadata()
        if self._worker is not None and isinstance(meta, Metadata) and meta.loads:
            self._worker.start_load(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Before attention reads ``layer_name``: until this step's loads copied it."""
        if self._worker is not None:
            self._worker.wait_for_layer(layer_name)

    def save_kv_layer(
        self,
        layer_name: str,
        kv_layer: torch.Tensor,
        attn_metadata: AttentionMetadata,
        **kwargs: Any,
    ) -> None:
        """Nothing per layer: whole chunks are stored in `wait_for_save`."""
        return None

    def wait_for_save(self) -> None:
        """After the forward: queue the step's planned stores for the store thread (or,
        with ``lmcache.mp.async_store = false``, run them here); a failed store is logged
        and skipped (the request is unaffected)."""
        meta = self._get_connector_metadata()
        if self._worker is not None and isinstance(meta, Metadata):
            self._worker.save(meta)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """Finished requests whose stores are done (vLLM frees their blocks now); loads
        finish inside the step that needs them, so none are reported here (a hybrid
        model's are, by `get_transfer_results`)."""
        done = self._worker.finished_stores() if self._worker is not None else set()
        return done or None, None

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        """Finished stores (`get_finished`) and, for a hybrid model, finished loads and the
        failed ones among them (its loads are asynchronous, see worker_groups.py)."""
        sending, _ = self.get_finished(finished_req_ids)
        received: set[str] = set()
        failed: set[str] = set()
        if isinstance(self._worker, GroupedWorkers):
            received, failed = self._worker.finished_loads()
        return KVConnectorTransferResults(
            finished_sending=set(sending or ()), finished_recving=received, failed_recving=failed
        )

    def get_block_ids_with_load_errors(self) -> set[int]:
        """Blocks whose load failed since the last call (vLLM recomputes them)."""
        return self._worker.load_errors() if self._worker is not None else set()

    def get_kv_connector_kv_cache_events(self) -> LMCacheKVEvents | None:
        """The blocks this worker's finished stores put into LMCache (KV events on)."""
        events = self._worker.take_events() if self._worker is not None else []
        return LMCacheKVEvents(events) if events else None

    # ----- both sides ------------------------------------------------------------------------

    def get_kv_connector_stats(self) -> LMCacheConnectorStats | None:
        """Counts since the last call: lookups (scheduler), loads and stores (workers)."""
        side = self._worker if self._worker is not None else self._scheduler
        data = side.stats.take() if side is not None else None
        return LMCacheConnectorStats(data=data) if data else None

    @classmethod
    def build_kv_connector_stats(
        cls, data: dict[str, Any] | None = None
    ) -> LMCacheConnectorStats | None:
        return LMCacheConnectorStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: VllmConfig,
        metric_types: dict[Any, Any],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> LMCachePromMetrics:
        return LMCachePromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()
        if self._scheduler is not None:
            self._scheduler.link.close()

    # ----- scheduler side ----------------------------------------------------------------

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        """Tokens beyond ``num_computed_tokens`` the server can load (None: ask again next
        step, an L2 prefetch is running); never a partial block."""
        assert self._scheduler is not None
        return self._scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        """vLLM allocated the blocks: plan the load of ``num_external_tokens`` into them."""
        assert self._scheduler is not None
        self._scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        """This step's loads and stores, for the workers (`Metadata`)."""
        assert self._scheduler is not None
        return self._scheduler.build_connector_meta(scheduler_output)

    def request_finished_all_groups(
        self, request: Request, block_ids: tuple[list[int], ...]
    ) -> tuple[bool, dict[str, Any] | None]:
        """`request_finished` under vLLM's hybrid KV cache manager (`SupportsHMA`)."""
        return self.request_finished(request, list(block_ids[0]) if block_ids else [])

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        """End the request's lookup session (its locks). True: it had stores, which may
        still run on the workers; vLLM keeps its blocks until `get_finished` reports it."""
        if self._scheduler is None:
            return False, None
        return self._scheduler.request_finished(request), None

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        """The workers' events of this step: counted until every rank reported one."""
        events = getattr(connector_output, "kv_cache_events", None)
        if self._scheduler is not None and self._scheduler.events is not None and events:
            self._scheduler.events.add(events.get_all_events())

    def take_events(self) -> Iterable[KVCacheEvent]:
        """Stores every rank finished, as vLLM's ``BlockStored`` (vLLM publishes them)."""
        if self._scheduler is None or self._scheduler.events is None:
            return ()
        return to_vllm(self._scheduler.events.take())

    def reset_cache(self) -> bool:
        return self._scheduler.reset_cache() if self._scheduler is not None else False


def _layered_min_tokens(setting: str) -> int | None:
    """``lmcache.mp.layerwise_load``: the fewest tokens a step loads for them to be copied
    layer by layer (None: never). auto = `LAYERED_MIN_TOKENS`, when a CPU is free for the
    copy thread (one that vLLM keeps free of its forward pass, or more CPUs than torch's
    compute threads); otherwise the copy thread would take one from the forward pass."""
    if setting != "auto":
        return 0 if setting == "true" else None
    import torch

    cpus, threads = len(os.sched_getaffinity(0)), int(torch.get_num_threads())
    spare = len(spare_cpus())
    layered = cpus > threads or spare > 0
    logger.info(
        "KV loads are copied %s (lmcache.mp.layerwise_load = auto: %d CPUs, %d compute "
        "threads, %d spare CPUs)",
        f"layer by layer beside the forward pass from {LAYERED_MIN_TOKENS} tokens a step"
        if layered else "before the forward pass",
        cpus, threads, spare,
    )  # fmt: skip
    return LAYERED_MIN_TOKENS if layered else None


def _link(config: ConnectorConfig, rank: int) -> ServerLink:
    """The link to the server, or the exception that stops vLLM: the message is logged
    once (rank 0) and the raised one is short, unchained, so vLLM's re-raising in each of
    its processes does not repeat it."""
    try:
        return ServerLink(config)
    except ServerLinkError as exc:
        raise report_once(exc, rank) from None


def _parallel(vllm_config: VllmConfig) -> ParallelStrategy:
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


def _group_instance(group: KVGroup) -> int:
    """The "GPU ID" of a non-primary KV cache group's registration: the process id (what
    the primary group uses) with the group in the high bits."""
    import os

    return os.getpid() | ((group.index + 1) << 40)


def _prefer_recompute(transfer: Any) -> None:
    """A failed load (server gone mid-request) must mean "recompute", not a failed request."""
    if getattr(transfer, "kv_load_failure_policy", "recompute") == "fail":
        try:
            transfer.kv_load_failure_policy = "recompute"
            logger.info("kv_load_failure_policy = recompute (a failed load is recomputed)")
        except Exception:  # frozen config: keep the user's setting
            logger.warning("kv_load_failure_policy is 'fail': a failed load fails its request")
