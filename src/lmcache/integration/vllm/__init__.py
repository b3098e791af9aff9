"""vLLM integration: the `LMCacheMPConnector` KV connector.

vLLM finds it two ways, both resolving to `lmcache_mp_connector.LMCacheMPConnector`:

1. ``"kv_connector": "LMCacheMPConnector"`` — vLLM's built-in module of that name
   imports a few `lmcache` names at import time, then prefers our class. The names
   it needs (the whole *import surface*, kept thin and tested against the installed
   vLLM in tests/vllm/test_import_surface.py):

   ====================================================  ==============================
   ``lmcache.integration.vllm.utils.mla_enabled``         `utils.py`
   ``lmcache.utils.init_logger``                          `lmcache/utils.py`
   ``lmcache.integration.vllm.vllm_multi_process_adapter`` `vllm_multi_process_adapter.py`
     (LMCacheMPSchedulerAdapter, LMCacheMPWorkerAdapter,
      LoadStoreOp, ParallelStrategy)
   ``lmcache.v1.multiprocess.custom_types``               `lmcache/v1/multiprocess/`
     (RequestAllocationRecord)
   ``lmcache.integration.vllm.lmcache_mp_connector``      the connector itself
   ====================================================  ==============================

2. ``"kv_connector_module_path": "lmcache.integration.vllm.lmcache_mp_connector"``.
"""
