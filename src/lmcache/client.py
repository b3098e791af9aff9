"""A small typed client for the engine-facing protocol.

    client = LMCacheClient.connect("localhost", 5555)
    pong = client.ping()                       # chunk size, server token
    client.register(instance_id, ...)          # once per KV-cache rank
    hit = client.lookup("req-1", model, ...)   # tokens, or None while pending
    client.retrieve(...); client.store(...); client.end_session("req-1")

Error replies are raised as the matching `lmcache.errors.ServerError` subclass;
a server that does not answer raises `ServerUnavailableError`.

A client made by `connect` moves by itself to the server's local endpoint (a Unix
socket of our uid, announced in the first ping) when it can: only there does the
server know it is an engine of its own uid (see README, "Threat model"). Over plain
TCP a peer may only ping, unless it authenticates with CurveZMQ keys (``curve``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any, TypedDict, TypeVar

import numpy as np

from lmcache.defaults import RPC_TIMEOUT_S, SERVER_PORT
from lmcache.errors import (
    ProtocolMismatchError,
    ServerError,
    ServerUnavailableError,
    error_from_code,
)
from lmcache.protocol.messages import (
    MAX_KV_EVENTS,
    PROTOCOL_VERSION,
    ChunkData,
    Clear,
    Commit,
    Committed,
    EndSession,
    ErrorReply,
    FreeLookup,
    KVEvents,
    KVLayout,
    KVMemory,
    Lookup,
    LookupReply,
    Ok,
    Ping,
    PollKVEvents,
    Pong,
    Prepared,
    PrepareRetrieve,
    PrepareStore,
    QueryLookup,
    RegisterKV,
    Reply,
    Request,
    Retrieve,
    RetrieveBytes,
    RetrieveReply,
    Store,
    StoreBytes,
    StoreReply,
    UnregisterKV,
    encode_tokens,
)
from lmcache.transport.base import Data, Transport
from lmcache.transport.zmq_client import (
    CurveClientKeys,
    ZmqTransport,
    local_endpoint_for,
    local_endpoint_usable,
    next_request_id,
    normalize_endpoint,
)

R = TypeVar("R", bound=Reply)
Tokens = Sequence[int] | np.ndarray | bytes


class ModelFields(TypedDict):
    """The model identity that `register` and `lookup` both take as keywords: a caller
    (a benchmark, a test) writes it once and passes ``**fields`` to either, typed."""

    model_name: str
    world_size: int
    dtype: str


def _token_bytes(tokens: Tokens) -> bytes:
    return tokens if isinstance(tokens, bytes) else encode_tokens(tokens)


class LMCacheClient:
    def __init__(self, transport: Transport, prefer_local: bool = False) -> None:
        self.transport = transport
        self._resolve_pending = prefer_local  # switch to the local endpoint at first contact
        self._resolve_lock = threading.Lock()

    @classmethod
    def connect(
        cls,
        host: str = "localhost",
        port: int = SERVER_PORT,
        timeout: float = RPC_TIMEOUT_S,
        curve: CurveClientKeys | None = None,
    ) -> LMCacheClient:
        endpoint = normalize_endpoint(host, port)
        local = local_endpoint_for(endpoint)
        if local_endpoint_usable(local):  # our uid's server on this host: go straight there
            return cls(ZmqTransport(local, timeout))
        return cls(ZmqTransport(endpoint, timeout, curve), prefer_local=True)

    @property
    def endpoint(self) -> str:
        return str(getattr(self.transport, "endpoint", "in-process"))

    def _resolve(self, timeout: float | None) -> None:
        """First contact: ping over the given endpoint; if the server announces a local
        endpoint that we may use, and it is the same server instance, move there."""
        reply, _ = self.transport.call(Ping(id=next_request_id()), timeout)
        self._resolve_pending = False
        if isinstance(reply, Pong):
            self._check_protocol(reply)
        if not isinstance(reply, Pong) or not local_endpoint_usable(reply.local_endpoint):
            return
        current = self.transport
        if not isinstance(current, ZmqTransport) or current.endpoint == reply.local_endpoint:
            return
        local = ZmqTransport(reply.local_endpoint, current.timeout)
        try:
            there, _ = local.call(Ping(id=next_request_id()), timeout)
        except ServerUnavailableError:
            local.close()
            return
        if not isinstance(there, Pong) or there.server_token != reply.server_token:
            local.close()  # another server instance: stay where we were told to go
            return
        self.transport = local
        current.close()

    def _check_protocol(self, pong: Pong) -> None:
        """Messages of another protocol version may decode but mean something else: stop at
        the first ping instead of exchanging them."""
        if pong.protocol != PROTOCOL_VERSION:
            raise ProtocolMismatchError(
                f"the LMCache server at {self.endpoint} (version {pong.version}) speaks protocol "
                f"{pong.protocol}, this client speaks protocol {PROTOCOL_VERSION}: run the same "
                "lmcache version on both sides"
            )

    def close(self) -> None:
        self.transport.close()

    def _call(self, request: Request, expect: type[R], timeout: float | None = None) -> R:
        return self._call_data(request, expect, timeout)[0]

    def _call_data(
        self, request: Request, expect: type[R], timeout: float | None = None, data: Any = ()
    ) -> tuple[R, Data]:
        if self._resolve_pending:
            with self._resolve_lock:
                if self._resolve_pending:
                    self._resolve(timeout)
        reply, frames = self.transport.call(request, timeout, data)
        if isinstance(reply, ErrorReply):
            raise error_from_code(reply.code, reply.message)
        if not isinstance(reply, expect):
            raise ServerError(f"expected {expect.__name__}, got {type(reply).__name__}")
        return reply, frames

    # ----- control ---------------------------------------------------------------------

    def ping(self, instance_id: int | None = None, timeout: float | None = None) -> Pong:
        pong = self._call(Ping(id=next_request_id(), instance_id=instance_id), Pong, timeout)
        self._check_protocol(pong)
        return pong

    def register(
        self,
        instance_id: int,
        *,
        model_name: str,
        world_size: int,
        rank: int,
        dtype: str,
        layout: KVLayout,
        memory: KVMemory,
        kv_spec: str = "",
    ) -> None:
        self._call(
            RegisterKV(
                id=next_request_id(),
                instance_id=instance_id,
                model_name=model_name,
                world_size=world_size,
                rank=rank,
                dtype=dtype,
                layout=layout,
                memory=memory,
                kv_spec=kv_spec,
            ),
            Ok,
        )

    def unregister(self, instance_id: int) -> None:
        self._call(UnregisterKV(id=next_request_id(), instance_id=instance_id), Ok)

    def clear(self) -> None:
        self._call(Clear(id=next_request_id()), Ok)

    def poll_kv_events(self, after: int = 0, limit: int = MAX_KV_EVENTS) -> KVEvents:
        """The server's KV event log after sequence number ``after`` (local peers only)."""
        return self._call(PollKVEvents(id=next_request_id(), after=after, limit=limit), KVEvents)

    # ----- lookups ------------------------------------------------------------------------

    def lookup(
        self,
        request_id: str,
        tokens: Tokens,
        *,
        model_name: str,
        world_size: int = 1,
        dtype: str,
        kv_spec: str = "",
        cache_salt: str = "",
        block_size: int = 0,
    ) -> int | None:
        """Start a lookup; returns hit tokens, or None while the server is still looking.
        ``block_size``: the engine's; the hit may then end on a block inside a chunk."""
        req = Lookup(
            id=next_request_id(),
            request_id=request_id,
            model_name=model_name,
            world_size=world_size,
            dtype=dtype,
            tokens=_token_bytes(tokens),
            kv_spec=kv_spec,
            cache_salt=cache_salt,
            block_size=block_size,
        )
        return self._call(req, LookupReply).hit_tokens

    def query_lookup(self, request_id: str) -> int | None:
        req = QueryLookup(id=next_request_id(), request_id=request_id)
        return self._call(req, LookupReply).hit_tokens

    def free_lookup(self, request_id: str, start: int = 0, end: int | None = None) -> None:
        req = FreeLookup(id=next_request_id(), request_id=request_id, start=start, end=end)
        self._call(req, Ok)

    def end_session(self, request_id: str) -> None:
        self._call(EndSession(id=next_request_id(), request_id=request_id), Ok)

    # ----- data movement ---------------------------------------------------------------------

    def store(
        self,
        request_id: str,
        instance_id: int,
        tokens: Tokens,
        *,
        start: int,
        end: int,
        block_ids: Sequence[int],
        cache_salt: str = "",
        timeout: float | None = None,
        want_keys: bool = False,
    ) -> StoreReply:
        req = Store(
            id=next_request_id(),
            request_id=request_id,
            instance_id=instance_id,
            tokens=_token_bytes(tokens),
            start=start,
            end=end,
            block_ids=list(block_ids),
            cache_salt=cache_salt,
            start_by=self._start_by(timeout),
            want_keys=want_keys,
        )
        return self._call(req, StoreReply, timeout)

    def retrieve(
        self,
        request_id: str,
        instance_id: int,
        tokens: Tokens,
        *,
        start: int,
        end: int,
        block_ids: Sequence[int],
        skip_tokens: int = 0,
        cache_salt: str = "",
        timeout: float | None = None,
    ) -> int:
        req = Retrieve(
            id=next_request_id(),
            request_id=request_id,
            instance_id=instance_id,
            tokens=_token_bytes(tokens),
            start=start,
            end=end,
            block_ids=list(block_ids),
            skip_tokens=skip_tokens,
            cache_salt=cache_salt,
            start_by=self._start_by(timeout),
        )
        return self._call(req, RetrieveReply, timeout).retrieved_tokens

    def _start_by(self, timeout: float | None) -> float:
        """When the server must have started copying our blocks (`protocol.messages.StartBy`):
        half our wait, so that a copy that starts in time ends before we stop waiting."""
        wait = timeout if timeout is not None else getattr(self.transport, "timeout", None)
        return time.monotonic() + (wait if wait is not None else RPC_TIMEOUT_S) / 2

    # ----- worker copies (lmcache_driven) ------------------------------------------------------

    def prepare_store(
        self, request_id: str, instance_id: int, tokens: Tokens, *, start: int, end: int,
        cache_salt: str = "", want_keys: bool = False,
    ) -> Prepared:  # fmt: skip
        """Reserve L1 slots; write each chunk at its offset in the pool, then `commit`."""
        req = PrepareStore(
            id=next_request_id(), request_id=request_id, instance_id=instance_id,
            tokens=_token_bytes(tokens), start=start, end=end, cache_salt=cache_salt,
            want_keys=want_keys,
        )  # fmt: skip
        return self._call(req, Prepared)

    def prepare_retrieve(
        self, request_id: str, instance_id: int, tokens: Tokens, *, start: int, end: int,
        cache_salt: str = "",
    ) -> Prepared:  # fmt: skip
        """Pin cached chunks; read each from its offset in the pool, then `commit`."""
        req = PrepareRetrieve(
            id=next_request_id(), request_id=request_id, instance_id=instance_id,
            tokens=_token_bytes(tokens), start=start, end=end, cache_salt=cache_salt,
        )  # fmt: skip
        return self._call(req, Prepared)

    def commit(self, instance_id: int, transfer_id: int, success: bool = True) -> int:
        """Finish a prepared transfer; returns the tokens stored or retrieved."""
        req = Commit(
            id=next_request_id(), instance_id=instance_id, transfer_id=transfer_id, success=success
        )
        return self._call(req, Committed).tokens

    # ----- bytes in the message (no shared memory, e.g. another host) ----------------------------

    def store_bytes(
        self, request_id: str, instance_id: int, tokens: Tokens, *, start: int, end: int,
        chunks: Sequence[Any], cache_salt: str = "", timeout: float | None = None,
        want_keys: bool = False,
    ) -> StoreReply:  # fmt: skip
        """Store chunks ``[start, end)``; ``chunks`` holds one buffer per chunk, in order."""
        req = StoreBytes(
            id=next_request_id(), request_id=request_id, instance_id=instance_id,
            tokens=_token_bytes(tokens), start=start, end=end, cache_salt=cache_salt,
            want_keys=want_keys,
        )  # fmt: skip
        return self._call_data(req, StoreReply, timeout, chunks)[0]

    def retrieve_bytes(
        self, request_id: str, instance_id: int, tokens: Tokens, *, start: int, end: int,
        cache_salt: str = "", timeout: float | None = None,
    ) -> Data:  # fmt: skip
        """The bytes of cached chunks ``[start, end)``, one buffer per chunk."""
        req = RetrieveBytes(
            id=next_request_id(), request_id=request_id, instance_id=instance_id,
            tokens=_token_bytes(tokens), start=start, end=end, cache_salt=cache_salt,
        )  # fmt: skip
        reply, frames = self._call_data(req, ChunkData, timeout)
        if len(frames) != reply.chunks:
            raise ServerError(f"expected {reply.chunks} data frames, got {len(frames)}")
        return frames
