"""Server settings: one pydantic model drives the CLI flags and the ``LMCACHE_*`` variables.

Each default is written exactly once: here, or in `lmcache.defaults` when a lower layer
(a client, the component a setting configures) needs it too. `lmcache server --l1-size-gb 8` and
``LMCACHE_L1_SIZE_GB=8 lmcache server`` mean the same thing; a flag beats the
variable, the variable beats the default.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from lmcache.defaults import (
    COPY_THREADS,
    EVICTION_INTERVAL_S,
    EVICTION_RATIO,
    HASH_MEMO_MB,
    L1_SIZE_GB,
    L2_BREAKER_S,
    L2_PREFETCH_WORKERS,
    L2_QUEUE_SIZE,
    L2_WRITERS,
    METRICS_NAMES,
    SERVER_PORT,
)
from lmcache.redact import redact
from lmcache.storage.eviction import canonical_name

# lmcache.storage.eviction.POLICIES (names case-insensitive: see `_policy`)
EvictionPolicyName = Literal["LRU", "LFU", "FIFO", "ARC", "IsolatedLRU", "noop"]
HashAlgorithm = Literal["sha256", "blake2b", "blake3"]
L2StorePolicyName = Literal["all", "first"]  # lmcache.storage.l2.policies.STORE_POLICIES
L2PrefetchPolicyName = Literal["order", "fastest"]  # ... .PREFETCH_POLICIES
MetricsNamesChoice = Literal["ours", "upstream", "both"]
MIN_L1_BYTES = 64 << 10  # 16 pages; tests run real servers with pools of 4 small chunks


class ServerSettings(BaseSettings):
    """Everything `lmcache server` can be told."""

    model_config = SettingsConfigDict(env_prefix="LMCACHE_", extra="forbid", frozen=True)

    host: str = Field("localhost", description="ZMQ bind address for engines")
    port: int = Field(SERVER_PORT, ge=1, le=65535, description="ZMQ port for engines")
    http_host: str = Field("0.0.0.0", description="HTTP frontend bind address")
    http_port: int = Field(8080, ge=0, le=65535, description="HTTP frontend port")
    http_max_connections: int = Field(
        256,
        ge=1,
        le=1 << 20,
        description="open HTTP connections at most: the longest-idle or half-open one is "
        "closed to admit a new one, 503 when all are busy (lowered to keep half of the "
        "file descriptors for ZMQ)",
    )
    http_header_timeout_s: float = Field(
        10.0,
        gt=0,
        allow_inf_nan=False,
        description="seconds an HTTP connection may take to send its request line and headers",
    )
    l1_size_gb: float = Field(
        L1_SIZE_GB, gt=0, allow_inf_nan=False, description="L1 shared-memory pool size in GiB"
    )
    l1_init_size_gb: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="GiB of the L1 pool given memory at start; the pool then grows as chunks "
        "arrive, up to --l1-size-gb (unset: all of it at start, or 1 GiB when /dev/shm has less "
        "free than --l1-size-gb)",
    )
    eviction_policy: EvictionPolicyName = Field(
        "LRU",
        description="L1 eviction policy (case-insensitive): LRU, LFU, FIFO, ARC (adaptive "
        "recency/frequency), IsolatedLRU (an LRU and a quota per cache_salt: /quota), noop "
        "(never evict)",
    )
    eviction_trigger_watermark: float | None = Field(
        None,
        gt=0,
        le=1,
        allow_inf_nan=False,
        description="evict in the background once L1 holds this share of --l1-size-gb "
        "(upstream: 0.8); unset: evict only when a store needs room",
    )
    eviction_ratio: float = Field(
        EVICTION_RATIO,
        gt=0,
        le=1,
        allow_inf_nan=False,
        description="with --eviction-trigger-watermark: free down to (watermark - ratio) of "
        "--l1-size-gb, counted in bytes",
    )
    eviction_interval_s: float = Field(
        EVICTION_INTERVAL_S,
        gt=0,
        le=3600,
        allow_inf_nan=False,
        description="seconds between two checks of the watermark",
    )
    default_quota_gb: float | None = Field(
        None,
        ge=0,
        allow_inf_nan=False,
        description="IsolatedLRU: GiB a cache_salt without a quota of its own may hold "
        "(unset: 0, as upstream; set quotas with PUT /quota/{cache_salt})",
    )
    max_workers: int = Field(4, ge=1, le=256, description="worker threads for data movement")
    copy_threads: int = Field(
        COPY_THREADS,
        ge=0,
        le=64,
        description="threads one KV block copy between an engine and L1 is split over "
        "(0 = auto: up to 4, at most the CPUs the server may run on; copies under 1 MiB use one)",
    )
    chunk_size: int = Field(256, ge=1, le=1 << 20, description="tokens per cached chunk")
    hash_algorithm: HashAlgorithm = Field("sha256", description="chunk hash function")
    hash_memo_mb: int = Field(
        HASH_MEMO_MB,
        ge=0,
        le=1 << 20,
        description="MiB of recent prompts' hash chains kept, so that the repeated lookups, "
        "retrieve and store of one prompt hash it once (0 = off)",
    )
    lock_ttl_s: float = Field(
        300.0, gt=0, description="seconds a read/write lock lives unless released"
    )
    l2_adapter: list[dict[str, Any]] = Field(
        default_factory=list,
        description="L2 tier as JSON, repeatable, in lookup order, e.g. "
        '\'{"type": "fs", "path": "/data/kv", "max_capacity_gb": 500}\' or '
        '\'{"type": "redis", "url": "redis://host:6379/0"}\'',
    )
    l2_store_policy: L2StorePolicyName = Field(
        "all",
        description="which L2 tiers a stored chunk is copied to: all = every tier that is up "
        "(a copy in each); first = the first tier that is up, in --l2-adapter order (a "
        "fallback chain: later tiers only while earlier ones are down)",
    )
    l2_prefetch_policy: L2PrefetchPolicyName = Field(
        "order",
        description="which L2 tier a chunk held by several tiers is read from: order = the "
        "first in --l2-adapter order; fastest = the highest read throughput measured so far "
        "(each tier is tried once first)",
    )
    l2_queue_size: int = Field(
        L2_QUEUE_SIZE,
        ge=1,
        le=1 << 20,
        description="chunks waiting to be copied to L2 at most; when the queue is full, a new "
        "chunk is not copied (counted in /status as queue_skipped_full)",
    )
    l2_prefetch_workers: int = Field(
        L2_PREFETCH_WORKERS,
        ge=1,
        le=256,
        description="threads that look chunks up in L2 and load them into L1",
    )
    l2_writers: int = Field(
        L2_WRITERS,
        ge=1,
        le=64,
        description="threads that copy stored chunks to L2, each with its own connection",
    )
    l2_breaker_s: float = Field(
        L2_BREAKER_S,
        ge=0,
        allow_inf_nan=False,
        description="seconds an L2 adapter is skipped after a failure, so that lookups do not "
        "wait for its timeout (0 = never skipped)",
    )
    engine_timeout_s: float = Field(
        60.0,
        ge=0,
        description="unregister engines silent this long (0 = never; the vLLM connector "
        "pings every second; engines whose process is gone are forgotten at once)",
    )
    curve_keys_dir: str | None = Field(
        None,
        description="directory of CurveZMQ keys: TCP peers must authenticate with a key in "
        "DIR/authorized (server key pair created in DIR on first use)",
    )
    admin_token: SecretStr | None = Field(
        None,
        description="bearer token that lets non-loopback HTTP peers use POST/PUT/DELETE/PATCH "
        "endpoints (/clear-cache, /clear-l2); without it they are loopback only. Prefer the "
        "variable: a flag shows in the process list",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="log level")
    # Upstream LMCache's flags whose meaning we honour (lmcache.upstream_flags maps the rest).
    instance_id: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9._:@/+-]+$",
        description="stable identity of this server, shown in /status, /version and the "
        "start-up log (default: a random UUID minted at start)",
    )
    disable_metrics: bool = Field(
        False, description="serve no Prometheus metrics (/metrics answers 404)"
    )
    disable_observability: bool = Field(
        False, description="upstream's switch for its event bus; here: --disable-metrics"
    )
    metrics_names: MetricsNamesChoice = Field(
        METRICS_NAMES,  # type: ignore[arg-type]
        description="which names /metrics shows: ours (lmcache_*), upstream LMCache's "
        "(lmcache_mp_*: its Grafana dashboard works unchanged) or both (about twice the "
        "series of either, all counted once and read at scrape time)",
    )
    kv_event_log_size: int = Field(
        0,
        ge=0,
        le=1 << 20,
        description="keep a log of this many KV events (chunks stored into and removed from "
        "L1) that engines poll, e.g. the vLLM connector for its KV events; 0 = no log",
    )
    prometheus_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="also serve Prometheus /metrics on this port (bound to --http-host)",
    )

    @field_validator("l1_size_gb")
    @classmethod
    def _at_least_64_kib(cls, value: float) -> float:
        if value * (1 << 30) < MIN_L1_BYTES:
            raise ValueError(
                f"must be at least {MIN_L1_BYTES / (1 << 30):.6f} (64 KiB), got {value:g}: the "
                "pool must hold at least one chunk (its size is known when an engine registers)"
            )
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("eviction_policy", mode="before")
    @classmethod
    def _policy(cls, value: object) -> object:
        return canonical_name(value) if isinstance(value, str) else value

    def redacted(self) -> dict[str, Any]:
        """The settings for display (/status): secrets are "***" (`lmcache.redact`), at any
        depth: URL credentials, secret query parameters, secret-named keys, the admin token."""
        data: dict[str, Any] = redact(self.model_dump())
        return data

    @property
    def metrics_enabled(self) -> bool:
        return not (self.disable_metrics or self.disable_observability)

    @property
    def l1_size_bytes(self) -> int:
        return int(self.l1_size_gb * (1 << 30))

    @property
    def l1_init_size_bytes(self) -> int | None:
        return None if self.l1_init_size_gb is None else int(self.l1_init_size_gb * (1 << 30))

    @property
    def default_quota_bytes(self) -> int | None:
        return None if self.default_quota_gb is None else int(self.default_quota_gb * (1 << 30))

    @property
    def hash_memo_bytes(self) -> int:
        return self.hash_memo_mb << 20

    @property
    def zmq_bind_endpoint(self) -> str:
        # libzmq binds to interfaces or IPs, not host names: map the common one.
        host = "127.0.0.1" if self.host == "localhost" else self.host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"tcp://{host}:{self.port}"
