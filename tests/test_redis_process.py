"""`RedisProcess`, the redis-server the tests and the benchmarks start: the jemalloc setting
we recommend (`REDIS_ENV`), extra settings and environment reach the real server
(``benchmarks/redis_write_behind.py`` compares Redis settings through them, so a setting
that silently did not apply would mislabel a row)."""

from __future__ import annotations

import pytest
import redis

from .conftest import start_redis


def _malloc_opt(client: redis.Redis, name: str) -> str:
    """jemalloc's ``opt.<name>`` as redis-server's allocator reports it."""
    stats = client.execute_command("MEMORY", "MALLOC-STATS")
    text = stats.decode() if isinstance(stats, bytes) else str(stats)
    for line in text.splitlines():
        if line.strip().startswith(f"opt.{name}:"):
            return line.split(":", 1)[1].split()[0].strip('"')
    raise AssertionError(f"opt.{name} not in MEMORY MALLOC-STATS:\n{text[:2000]}")


def test_settings_and_environment_reach_redis_server() -> None:
    plain = start_redis()
    tuned = start_redis(
        args=("--maxmemory", "5mb", "--maxmemory-policy", "allkeys-lru", "--disable-thp", "no"),
        env={"MALLOC_CONF": "thp:always"},
    )
    try:
        with redis.Redis(port=plain.port) as a, redis.Redis(port=tuned.port) as b:
            if not str(a.info("memory")["mem_allocator"]).startswith("jemalloc"):
                pytest.skip("this redis-server does not use jemalloc")
            # the recommended setting by default: freed pages are kept for reuse
            assert _malloc_opt(a, "dirty_decay_ms") == "-1"
            assert _malloc_opt(a, "muzzy_decay_ms") == "-1"
            assert _malloc_opt(a, "thp") != "always"
            # env replaces it: jemalloc's default decay, and the option it names
            assert _malloc_opt(b, "thp") == "always"
            assert _malloc_opt(b, "dirty_decay_ms") != "-1"
            assert a.config_get("maxmemory")["maxmemory"] == "0"
            assert b.config_get("maxmemory")["maxmemory"] == str(5 << 20)
            assert b.config_get("maxmemory-policy")["maxmemory-policy"] == "allkeys-lru"
            assert a.config_get("disable-thp")["disable-thp"] == "yes"
            assert b.config_get("disable-thp")["disable-thp"] == "no"
            # ours come first and stay: no persistence
            assert b.config_get("appendonly")["appendonly"] == "no"
            assert b.config_get("save")["save"] == ""
    finally:
        plain.stop()
        tuned.stop()


def test_the_write_behind_benchmark_runs_every_variant() -> None:
    """``benchmarks/redis_write_behind.py`` end to end on tiny objects: every variant starts
    its redis-server, puts, reads back (each object checked present) and reports a median."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    if shutil.which("redis-server") is None:
        start_redis()  # skips, or fails under LMCACHE_REQUIRE_REDIS=1
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "redis_write_behind.py"
    done = subprocess.run(
        [sys.executable, str(script), "--rounds", "1", "--reps", "1", "--objects", "2",
         "--object-mib", "5"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    medians = done.stdout.split("\nmedians", 1)[1].splitlines()[1:]
    rows = {ln.split()[0]: ln.split() for ln in medians if ln and not ln.startswith("fresh")}
    assert set(rows) == {
        "base", "thp", "unix", "writers2", "part4m64", "part16", "sndbuf", "nodecay", "full",
    }  # fmt: skip
    for name, cells in rows.items():
        assert float(cells[1]) > 0, name  # put GB/s
        assert (cells[6] == "nan") == (name == "full"), name  # get GB/s: not in a full Redis
