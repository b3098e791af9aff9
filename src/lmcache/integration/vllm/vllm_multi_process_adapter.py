"""Names that vLLM's built-in `LMCacheMPConnector` module imports at import time.

vLLM only uses them in its own fallback connector, which our package replaces
(see `lmcache.integration.vllm`); they map to our scheduler and worker halves
and our transfer descriptions, so the import succeeds with real classes.
"""

from lmcache.integration.vllm.metadata import LoadSpec as LoadStoreOp
from lmcache.integration.vllm.metadata import ParallelStrategy
from lmcache.integration.vllm.scheduler import SchedulerSide as LMCacheMPSchedulerAdapter
from lmcache.integration.vllm.worker import WorkerSide as LMCacheMPWorkerAdapter

__all__ = [
    "LMCacheMPSchedulerAdapter",
    "LMCacheMPWorkerAdapter",
    "LoadStoreOp",
    "ParallelStrategy",
]
