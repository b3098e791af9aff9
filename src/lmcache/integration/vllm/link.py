"""The connection to the server, with a heartbeat and a degraded mode.

    healthy ──ping fails / a call times out──> degraded: lookups miss, stores are
       ^                                        skipped, loads fail (vLLM recomputes)
       └──── ping answers again (and `on_recover` re-registered the KV caches) ─┘

A ping also carries the server's per-start token: a changed token means the
server restarted (even between two heartbeats), so the worker registers again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from lmcache.client import LMCacheClient
from lmcache.defaults import L1_SIZE_GB, SERVER_PORT
from lmcache.errors import LMCacheError, ProtocolMismatchError, ServerUnavailableError
from lmcache.integration.vllm.config import ConnectorConfig
from lmcache.protocol.messages import Pong
from lmcache.transport.zmq_client import refuses_connections

logger = logging.getLogger("lmcache.integration")


class ServerLinkError(ConnectionError):
    """The link could not start: no server answers, or an incompatible one does. Its str
    is the whole story (where, why, what to do); `report_once` logs it for vLLM."""


class LMCacheStartError(RuntimeError):
    """What the connector raises to vLLM instead of a `ServerLinkError`: vLLM repeats an
    exception's str in every process it passes through (worker, engine core, API server),
    so this one's str is short and the real message is logged once before it."""


_reported = threading.Event()


def unreachable(endpoint: str, reason: str) -> ServerLinkError:
    """Where we tried, why it failed, and the two ways out (start a server, or aim at it)."""
    return ServerLinkError(
        f"Cannot reach the LMCache server at {endpoint} ({reason}). Start it first with "
        f"`lmcache server` (port {SERVER_PORT}, a {L1_SIZE_GB:g} GiB L1 by default; --port "
        "and --l1-size-gb change them), or set lmcache.mp.host / lmcache.mp.port in "
        "kv_connector_extra_config to where it runs."
    )


def report_once(exc: ServerLinkError, rank: int) -> LMCacheStartError:
    """Log ``exc`` once per process and only from rank 0 (every TP rank fails alike), and
    return the short exception to raise ``from None`` in its place."""
    if rank == 0 and not _reported.is_set():
        _reported.set()
        logger.error("%s", exc)
    return LMCacheStartError(
        "the LMCache connector could not start (the LMCache ERROR above says why)"
    )


class ServerLink:
    def __init__(
        self,
        config: ConnectorConfig,
        instance_id: int | None = None,
        on_recover: Callable[[Pong], None] | None = None,
    ) -> None:
        self.config = config
        self.instance_id = instance_id
        self.on_recover = on_recover
        curve = config.curve_keys()
        self.client = LMCacheClient.connect(config.host, config.port, config.rpc_timeout, curve)
        self._probe = LMCacheClient.connect(config.host, config.port, config.rpc_timeout, curve)
        self._healthy = threading.Event()
        self._healthy.set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            if refuses_connections(self.endpoint):  # fail now, not after rpc_timeout
                raise unreachable(self.endpoint, "connection refused")
            self.pong = self._probe.ping(instance_id)
        except ServerLinkError:
            self.close()
            raise
        except ProtocolMismatchError as exc:  # it answered: "cannot reach" would mislead
            self.close()
            raise ServerLinkError(f"Incompatible LMCache server: {exc}") from None
        except ServerUnavailableError:
            self.close()
            why = f"no reply within {config.rpc_timeout:g}s"
            raise unreachable(self.endpoint, why) from None
        except LMCacheError as exc:
            self.close()
            raise unreachable(self.endpoint, str(exc)) from None

    @property
    def endpoint(self) -> str:
        return self._probe.endpoint

    @property
    def chunk_size(self) -> int:
        return self.pong.chunk_size

    @property
    def healthy(self) -> bool:
        return self._healthy.is_set()

    def start_heartbeat(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._beat, name="lmcache-heartbeat", daemon=True
            )
            self._thread.start()

    def mark_down(self, reason: object) -> None:
        """A call failed: stop using the server until a ping answers again."""
        if self._healthy.is_set():
            self._healthy.clear()
            logger.warning(
                "LMCache server at %s is unreachable (%s): entering degraded mode; vLLM goes on "
                "without the cache", self.endpoint, reason,
            )  # fmt: skip

    def _beat(self) -> None:
        while not self._stop.wait(self.config.heartbeat_interval):
            try:
                pong = self._probe.ping(self.instance_id)
            except LMCacheError as exc:
                self.mark_down(exc)
                continue
            restarted = pong.server_token != self.pong.server_token
            lost = self.instance_id is not None and not pong.engine_registered
            needs_recovery = restarted or lost or not self.healthy
            if needs_recovery and not self._recover(pong, restarted):
                continue
            self.pong = pong

    def _recover(self, pong: Pong, restarted: bool) -> bool:
        try:
            if self.on_recover is not None:
                self.on_recover(pong)
        except LMCacheError as exc:
            self.mark_down(exc)
            return False
        except Exception:
            logger.exception("re-registration with the LMCache server failed")
            self.mark_down("re-registration failed")
            return False
        if not self.healthy or restarted:
            logger.info(
                "LMCache server at %s is %s: caching resumed",
                self.endpoint, "back (restarted)" if restarted else "back",
            )  # fmt: skip
        self._healthy.set()
        return True

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.client.close()
        self._probe.close()
