"""`RedisProcess`, the redis-server the tests and the benchmarks start: extra settings and
environment reach the real server (``benchmarks/redis_write_behind.py`` compares Redis
settings through them, so a setting that silently did not apply would mislabel a row)."""

from __future__ import annotations

import redis

from .conftest import start_redis


def _malloc_opt(client: redis.Redis, name: str) -> str | None:
    """jemalloc's ``opt.<name>`` as redis-server's allocator reports it (None: not jemalloc)."""
    if not str(client.info("memory")["mem_allocator"]).startswith("jemalloc"):
        return None
    stats = client.execute_command("MEMORY", "MALLOC-STATS")
    text = stats.decode() if isinstance(stats, bytes) else str(stats)
    for line in text.splitlines():
        if line.strip().startswith(f"opt.{name}:"):
            return line.split(":", 1)[1].strip().strip('"')
    return None


def test_settings_and_environment_reach_redis_server() -> None:
    plain = start_redis()
    tuned = start_redis(
        args=("--maxmemory", "5mb", "--maxmemory-policy", "allkeys-lru", "--disable-thp", "no"),
        env={"MALLOC_CONF": "thp:always"},
    )
    try:
        with redis.Redis(port=plain.port) as a, redis.Redis(port=tuned.port) as b:
            assert a.config_get("maxmemory")["maxmemory"] == "0"
            assert b.config_get("maxmemory")["maxmemory"] == str(5 << 20)
            assert b.config_get("maxmemory-policy")["maxmemory-policy"] == "allkeys-lru"
            assert a.config_get("disable-thp")["disable-thp"] == "yes"
            assert b.config_get("disable-thp")["disable-thp"] == "no"
            if _malloc_opt(a, "thp") is not None:  # Debian's redis-server: system jemalloc
                assert _malloc_opt(a, "thp") != "always"
                assert _malloc_opt(b, "thp") == "always"
            # ours come first, so --save "" and --appendonly no still hold
            assert b.config_get("appendonly")["appendonly"] == "no"
    finally:
        plain.stop()
        tuned.stop()
