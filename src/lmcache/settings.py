"""Server settings: one pydantic model drives the CLI flags and the ``LMCACHE_*`` variables.

Each default is written exactly once, here. `lmcache server --l1-size-gb 8` and
``LMCACHE_L1_SIZE_GB=8 lmcache server`` mean the same thing; a flag beats the
variable, the variable beats the default.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

EvictionPolicyName = Literal["LRU", "LFU", "FIFO"]
HashAlgorithm = Literal["sha256", "blake2b"]


class ServerSettings(BaseSettings):
    """Everything `lmcache server` can be told."""

    model_config = SettingsConfigDict(env_prefix="LMCACHE_", extra="forbid", frozen=True)

    host: str = Field("localhost", description="ZMQ bind address for engines")
    port: int = Field(5555, ge=1, le=65535, description="ZMQ port for engines")
    http_host: str = Field("0.0.0.0", description="HTTP frontend bind address")
    http_port: int = Field(8080, ge=0, le=65535, description="HTTP frontend port")
    l1_size_gb: float = Field(4.0, gt=0, description="L1 shared-memory pool size in GiB")
    eviction_policy: EvictionPolicyName = Field("LRU", description="L1 eviction policy")
    max_workers: int = Field(4, ge=1, le=256, description="worker threads for data movement")
    chunk_size: int = Field(256, ge=1, le=1 << 20, description="tokens per cached chunk")
    hash_algorithm: HashAlgorithm = Field("sha256", description="chunk hash function")
    lock_ttl_s: float = Field(
        300.0, gt=0, description="seconds a read/write lock lives unless released"
    )
    l2_adapter: list[dict[str, Any]] = Field(
        default_factory=list,
        description="L2 tier as JSON, repeatable, in lookup order, e.g. "
        '\'{"type": "fs", "path": "/data/kv", "max_capacity_gb": 500}\' or '
        '\'{"type": "redis", "url": "redis://host:6379/0"}\'',
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
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="log level")

    @field_validator("eviction_policy", "log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    def redacted(self) -> dict[str, Any]:
        """The settings for display: credentials in L2 URLs are masked."""
        data = self.model_dump()
        data["l2_adapter"] = [
            {k: _mask_url(v) if isinstance(v, str) and "://" in v else v for k, v in c.items()}
            for c in data["l2_adapter"]
        ]
        return data

    @property
    def l1_size_bytes(self) -> int:
        return int(self.l1_size_gb * (1 << 30))

    @property
    def zmq_bind_endpoint(self) -> str:
        # libzmq binds to interfaces or IPs, not host names: map the common one.
        host = "127.0.0.1" if self.host == "localhost" else self.host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"tcp://{host}:{self.port}"


def _mask_url(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if "@" not in rest.split("/", 1)[0]:
        return url
    return f"{scheme}{sep}***@{rest.split('@', 1)[1]}"
