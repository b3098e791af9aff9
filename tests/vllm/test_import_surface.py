"""The names vLLM's built-in `LMCacheMPConnector` module imports from `lmcache` resolve to ours."""

from __future__ import annotations

import importlib
import inspect


def test_builtin_connector_name_resolves_to_our_class() -> None:
    builtin = importlib.import_module(
        "vllm.distributed.kv_transfer.kv_connector.v1.lmcache_mp_connector"
    )
    ours = importlib.import_module("lmcache.integration.vllm.lmcache_mp_connector")
    assert builtin.LMCacheMPConnector is ours.LMCacheMPConnector


def test_every_lmcache_name_vllm_imports_exists() -> None:
    builtin = importlib.import_module(
        "vllm.distributed.kv_transfer.kv_connector.v1.lmcache_mp_connector"
    )
    source = inspect.getsource(builtin)
    imported = [line.strip() for line in source.splitlines() if "from lmcache" in line]
    assert imported, "vLLM no longer imports lmcache: revisit lmcache.integration.vllm"
    from lmcache.integration.vllm import utils, vllm_multi_process_adapter
    from lmcache.utils import init_logger
    from lmcache.v1.multiprocess import custom_types

    assert callable(utils.mla_enabled) and callable(init_logger)
    for name in (
        "LMCacheMPSchedulerAdapter",
        "LMCacheMPWorkerAdapter",
        "LoadStoreOp",
        "ParallelStrategy",
    ):
        assert hasattr(vllm_multi_process_adapter, name)
    assert custom_types.RequestAllocationRecord is custom_types.BlockAllocationRecord
    modules = {line.split()[1] for line in imported}
    assert modules <= {
        "lmcache.integration.vllm.utils",
        "lmcache.utils",
        "lmcache.integration.vllm.vllm_multi_process_adapter",
        "lmcache.v1.multiprocess.custom_types",
        "lmcache.integration.vllm.lmcache_mp_connector",
    }, modules


def test_connector_satisfies_vllms_abstract_interface() -> None:
    from lmcache.integration.vllm.lmcache_mp_connector import LMCacheMPConnector

    assert not inspect.isabstract(LMCacheMPConnector)
    params = list(inspect.signature(LMCacheMPConnector.__init__).parameters)
    assert params[:4] == ["self", "vllm_config", "role", "kv_cache_config"]
