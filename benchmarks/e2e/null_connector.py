"""A KV connector that does nothing, for the ``vllm-null-connector`` configuration.

What vLLM itself does differently once any ``--kv-transfer-config`` is set (its connector
calls every step, the metadata it builds and ships to the worker, the output it gathers
back) is part of every connector's cost, ours and upstream's. Measured alone it tells how
much of a gap to "vLLM alone" is ours to close:

    vllm-prefix  ──  vllm-null-connector  ──  lmcache
       vLLM's plumbing ┘            our connector and server ┘

Loaded by vLLM through ``kv_connector_module_path: e2e.null_connector`` (``benchmarks`` on
``PYTHONPATH``); it never looks anything up, loads or stores.
"""

from __future__ import annotations

from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1 import KVConnectorBase_V1
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata, SupportsHMA


class NullMetadata(KVConnectorMetadata):  # type: ignore[misc]
    pass


class NullConnector(KVConnectorBase_V1, SupportsHMA):  # type: ignore[misc]
    """Declares the same interfaces as ours (`SupportsHMA`), so vLLM treats both alike."""

    # scheduler side
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> Any:
        return 0, False

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        pass

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        return NullMetadata()

    def request_finished_all_groups(self, request: Any, block_ids: Any) -> tuple[bool, None]:
        return False, None

    # worker side
    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        pass

    def wait_for_layer_load(self, layer_name: str) -> None:
        pass

    def save_kv_layer(
        self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any
    ) -> None:
        pass

    def wait_for_save(self) -> None:
        pass
