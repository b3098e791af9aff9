"""Compatibility package: module paths that vLLM imports (see lmcache.integration.vllm)."""
