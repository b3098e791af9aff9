"""Our connector with every store held back a while, loaded by vLLM through
``kv_connector_module_path`` (tests/vllm/test_vllm_overlap.py).

Stores of the tiny test model take well under a millisecond, so a store that reads blocks
vLLM has already handed to another request would almost never be caught in the act. Held
back, stores are still running when vLLM preempts, frees and reuses blocks: reading
reused blocks would then cache wrong bytes, and the test would see wrong output.
"""

from __future__ import annotations

import os
import time
from typing import Any

from lmcache.integration.vllm.lmcache_mp_connector import LMCacheMPConnector
from lmcache.integration.vllm.metadata import StoreSpec
from lmcache.integration.vllm.worker import WorkerSide

DELAY_S = float(os.environ.get("LMCACHE_TEST_STORE_DELAY_S", "0.3"))


class SlowStoreConnector(LMCacheMPConnector):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        worker = self._worker
        assert worker is None or isinstance(worker, WorkerSide), "one KV cache group expected"
        queue = worker._stores if worker is not None else None
        if queue is not None:
            store = queue._run

            def held_back(spec: StoreSpec) -> None:
                time.sleep(DELAY_S)
                store(spec)

            queue._run = held_back
