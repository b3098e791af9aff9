"""The connector's settings, read from ``kv_connector_extra_config`` (keys ``lmcache.mp.*``)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal, cast

from lmcache.defaults import COPY_THREADS, KV_EVENT_POLL_S, RPC_TIMEOUT_S, SERVER_PORT
from lmcache.errors import ConfigError
from lmcache.transport.zmq_client import CurveClientKeys

logger = logging.getLogger("lmcache.integration")

LAYERED_MIN_TOKENS = 4096
"""With ``layerwise_load: auto``: the fewest tokens a step loads for them to be copied layer
by layer (measured on 2 cores, warm TTFT against the copy before the forward pass: 1,900
tokens 95.0 vs 87.5 ms, 8,000 tokens 153.5 vs 172.5 ms; the threshold lies between)."""

PREFIX = "lmcache.mp."
TransferMode = Literal["auto", "engine_driven", "lmcache_driven"]
TRANSFER_MODES = ("auto", "engine_driven", "lmcache_driven")
LAYERWISE_CHOICES = ("auto", "true", "false")


def _bool(raw: object) -> bool:
    """JSON true/false, or the strings people write in shell-quoted configs."""
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)


_CASTS: dict[Any, Any] = {"str": str, "int": int, "float": float, "bool": _bool}


@dataclass(frozen=True)
class ConnectorConfig:
    host: str = "tcp://localhost"  # plain hosts and IPs are accepted too
    port: int = SERVER_PORT
    mp_transfer_mode: str = "auto"  # auto | engine_driven | lmcache_driven
    rpc_timeout: float = (
        RPC_TIMEOUT_S  # seconds to wait for a reply before the server counts as down
    )
    heartbeat_interval: float = 1.0  # seconds between pings (and reconnection attempts)
    # Stores run on a thread after the step (vLLM keeps a finished request's blocks until
    # they are done); false: inside `wait_for_save`, the step waits (store_queue.py).
    async_store: bool = True
    # Threads one block copy is split over (0 = auto: up to 4, at most the usable CPUs;
    # copies under 1 MiB use one). The server's --copy-threads, for this worker's copies.
    copy_threads: int = COPY_THREADS
    # Loads copied layer by layer while the forward pass runs (layered_load.py), once vLLM
    # is seen to wait for each layer; false: all at once before the forward pass; auto:
    # layered for a step that loads at least LAYERED_MIN_TOKENS, and only with a CPU free
    # for the copy thread (cpus.py); measured on 2 cores, a copy thread that shares the
    # forward pass's CPU, or a short load, loses more than it hides.
    layerwise_load: str = "auto"  # auto | true | false
    # With vLLM's KV events on: seconds between polls of the server's KV event log, for
    # the removal of blocks we announced (0 = never poll; kv_events.py).
    kv_event_poll_interval: float = KV_EVENT_POLL_S
    # A server on another host (README, "Threat model"): its server.key and our key_secret.
    curve_server_key: str = ""
    curve_client_cert: str = ""

    def curve_keys(self) -> CurveClientKeys | None:
        if not (self.curve_server_key or self.curve_client_cert):
            return None
        if not (self.curve_server_key and self.curve_client_cert):
            raise ConfigError(f"set both {PREFIX}curve_server_key and {PREFIX}curve_client_cert")
        try:
            return CurveClientKeys.from_files(self.curve_server_key, self.curve_client_cert)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load the CurveZMQ keys: {exc}") from None

    @property
    def transfer_mode(self) -> TransferMode:
        return cast(TransferMode, self.mp_transfer_mode)

    @classmethod
    def from_extra_config(
        cls, extra: Mapping[str, Any] | None, log: bool = True
    ) -> ConnectorConfig:
        extra = dict(extra or {})
        values: dict[str, Any] = {}
        for f in fields(cls):
            key = PREFIX + f.name
            if key not in extra:
                continue
            raw = extra.pop(key)
            try:
                value = _CASTS[f.type](raw)
            except (TypeError, ValueError):
                raise ConfigError(f"{key} must be a {f.type}, got {raw!r}") from None
            if f.name == "layerwise_load":  # JSON true/false, or the words
                value = str(value).strip().lower()
            values[f.name] = value
            if log and value != f.default:
                logger.info("%s = %s (overridden, default: %s)", key, value, f.default)
        unknown = sorted(k for k in extra if k.startswith(PREFIX))
        if unknown:
            logger.warning("ignoring unknown connector settings: %s", ", ".join(unknown))
        config = cls(**values)
        if config.mp_transfer_mode not in TRANSFER_MODES:
            raise ConfigError(
                f"{PREFIX}mp_transfer_mode must be one of {', '.join(TRANSFER_MODES)}, "
                f"got {config.mp_transfer_mode!r}"
            )
        if config.layerwise_load not in LAYERWISE_CHOICES:
            raise ConfigError(
                f"{PREFIX}layerwise_load must be one of {', '.join(LAYERWISE_CHOICES)}, "
                f"got {config.layerwise_load!r}"
            )
        if not 0 <= config.copy_threads <= 64:
            raise ConfigError(f"{PREFIX}copy_threads must be 0 (auto) to 64")
        if config.rpc_timeout <= 0 or config.heartbeat_interval <= 0:
            raise ConfigError(f"{PREFIX}rpc_timeout and heartbeat_interval must be positive")
        return config
