"""Helpers of benchmarks/vllm_e2e.py: processes, workloads and the report."""
