"""Request handlers: what the server does for each message type.

`RequestHandler.dispatch` answers cheap requests (ping, lookup, locks,
registration) immediately, on the socket loop, and returns a callable for
requests that move data (store, retrieve), which the transport runs on its
worker pool. Every failure becomes a typed `ErrorReply`; nothing escapes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from lmcache import __version__
from lmcache.engine.registry import Engine, EngineRegistry, check_identity
from lmcache.errors import BadRequestError, CacheMissError, ServerError, TransferError
from lmcache.protocol.codec import error_reply
from lmcache.protocol.messages import (
    Clear,
    Commit,
    EndSession,
    ErrorCode,
    FreeLookup,
    Lookup,
    LookupReply,
    Ok,
    Ping,
    Pong,
    PrepareRetrieve,
    PrepareStore,
    QueryLookup,
    RegisterKV,
    Reply,
    Request,
    Retrieve,
    RetrieveReply,
    Store,
    StoreReply,
    UnregisterKV,
)
from lmcache.server.metrics import Metrics
from lmcache.server.sessions import Sessions
from lmcache.server.worker_copy import PreparedTransfers
from lmcache.storage.keys import TOKEN_BYTES, ChunkHasher, Namespace, object_key
from lmcache.storage.l1 import L1Cache
from lmcache.types import ObjectKey

logger = logging.getLogger("lmcache.server")

Deferred = Callable[[], Reply]
RangeRequest = Store | Retrieve | PrepareStore | PrepareRetrieve


class RequestHandler:
    def __init__(
        self,
        *,
        l1: L1Cache,
        registry: EngineRegistry,
        sessions: Sessions,
        hasher: ChunkHasher,
        metrics: Metrics,
        server_token: str,
        lock_ttl: float,
        pool_name: str = "",
    ) -> None:
        self.l1 = l1
        self.registry = registry
        self.sessions = sessions
        self.hasher = hasher
        self.chunk_size = hasher.chunk_size
        self.metrics = metrics
        self.server_token = server_token
        self.lock_ttl = lock_ttl
        self.pool_name = pool_name
        self.prepared = PreparedTransfers(l1, sessions, metrics, self.chunk_size, lock_ttl)
        self._inline: dict[type[Any], Callable[[Any], Reply]] = {
            Ping: self._ping,
            RegisterKV: self._register,
            UnregisterKV: self._unregister,
            Lookup: self._lookup,
            QueryLookup: self._query_lookup,
            FreeLookup: self._free_lookup,
            EndSession: self._end_session,
            Clear: self._clear,
            PrepareStore: self._prepare_store,
            PrepareRetrieve: self._prepare_retrieve,
            Commit: self.prepared.commit,
        }
        self._pooled: dict[type[Any], Callable[[Any], Reply]] = {
            Store: self._store,
            Retrieve: self._retrieve,
        }

    # ----- dispatch -------------------------------------------------------------------

    def dispatch(self, req: Request) -> Reply | Deferred:
        handler = self._inline.get(type(req))
        if handler is not None:
            return self._run(handler, req)
        pooled = self._pooled[type(req)]
        return lambda: self._run(pooled, req)

    def _run(self, handler: Callable[[Any], Reply], req: Request) -> Reply:
        op = req.__struct_config__.tag
        start = time.perf_counter()
        outcome = "ok"
        try:
            return handler(req)
        except ServerError as exc:
            outcome = exc.code
            logger.warning("%s request %d rejected: %s", op, req.id, exc.message)
            return error_reply(req.id, ErrorCode(exc.code), exc.message)
        except Exception as exc:
            outcome = ErrorCode.INTERNAL.value
            logger.exception("%s request %d failed", op, req.id)
            return error_reply(req.id, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        finally:
            self.metrics.requests.labels(op, outcome).inc()
            self.metrics.request_duration.labels(op).observe(time.perf_counter() - start)

    # ----- control --------------------------------------------------------------------

    def _ping(self, req: Ping) -> Reply:
        return Pong(
            id=req.id,
            server_token=self.server_token,
            chunk_size=self.chunk_size,
            version=__version__,
            engine_registered=self.registry.touch(req.instance_id),
            l1_pool=self.pool_name,
        )

    def _register(self, req: RegisterKV) -> Reply:
        engine = self.registry.register(req)
        logger.info(
            "Registered KV cache for GPU ID %d with %d layers",
            req.instance_id,
            engine.layout.num_layers,
        )
        return Ok(id=req.id)

    def _unregister(self, req: UnregisterKV) -> Reply:
        if self.registry.unregister(req.instance_id):
            logger.info("Unregistered KV cache for GPU ID %d", req.instance_id)
        else:
            logger.warning("No KV cache found for GPU ID %d to unregister", req.instance_id)
        return Ok(id=req.id)

    def _clear(self, req: Clear) -> Reply:
        removed = self.l1.clear()
        logger.info("Cleared %d chunks from L1", removed)
        return Ok(id=req.id)

    # ----- lookups ----------------------------------------------------------------------

    def _lookup(self, req: Lookup) -> Reply:
        check_identity(req.model_name, req.world_size, req.dtype, req.cache_salt)
        if not req.request_id:
            raise BadRequestError("request_id must not be empty")
        num_tokens = self._token_count(req.tokens)
        hashes = self.hasher.hashes(req.tokens, num_tokens // self.chunk_size)
        digests = [
            Namespace(
                req.model_name, req.world_size, rank, req.dtype, req.kv_spec, req.cache_salt
            ).digest
            for rank in range(req.world_size)
        ]
        groups = [[object_key(d, h) for d in digests] for h in hashes]
        lease = self.l1.acquire_prefix(groups, owner=req.request_id, ttl=self.lock_ttl)
        session = self.sessions.start(req.request_id, lease, groups)
        self.metrics.lookup_requested_tokens.inc(num_tokens)
        self.metrics.lookup_hit_tokens.inc(session.hit_tokens or 0)
        return LookupReply(id=req.id, hit_tokens=session.hit_tokens)

    def _query_lookup(self, req: QueryLookup) -> Reply:
        session = self.sessions.get(req.request_id)
        if session is None:
            logger.warning("lookup status asked for unknown request %r", req.request_id[:200])
            return LookupReply(id=req.id, hit_tokens=0)
        return LookupReply(id=req.id, hit_tokens=session.hit_tokens)

    def _free_lookup(self, req: FreeLookup) -> Reply:
        if req.start < 0 or (req.end is not None and req.end < req.start):
            raise BadRequestError(f"invalid token range [{req.start}, {req.end})")
        self.sessions.free_range(req.request_id, req.start, req.end)
        return Ok(id=req.id)

    def _end_session(self, req: EndSession) -> Reply:
        self.sessions.end(req.request_id)
        return Ok(id=req.id)

    # ----- data movement (worker pool) -------------------------------------------------------

    def _store(self, req: Store) -> Reply:
        engine = self.registry.get(req.instance_id)
        transfer = engine.require_transfer()
        keys, ids = self._chunk_keys(engine, req)
        start = time.perf_counter()
        stored = cached = 0
        no_space = False
        bpc = engine.blocks_per_chunk
        for i, key in enumerate(keys):
            slot = self.l1.reserve_write(key, engine.chunk_bytes)
            if slot == "cached":
                cached += 1
                continue
            if slot == "no_space":
                no_space = True
                break
            try:
                dst = self.l1.view(slot.offset, slot.nbytes).reshape(engine.chunk_shape)
                transfer.gather(ids[i * bpc : (i + 1) * bpc], dst)
            except BaseException:
                self.l1.abort_write(slot)
                raise
            stored += self.l1.commit_write(slot)
        elapsed = time.perf_counter() - start
        stored_tokens = stored * self.chunk_size
        if stored:
            logger.info("Stored %d tokens in %.3f seconds", stored_tokens, elapsed)
        if no_space:
            self.metrics.store_no_space.inc()
            logger.warning("L1 is full of locked chunks: stored %d of %d chunks", stored, len(keys))
        self.metrics.stored_tokens.inc(stored_tokens)
        self.metrics.stored_bytes.inc(stored * engine.chunk_bytes)
        return StoreReply(
            id=req.id,
            stored_tokens=stored_tokens,
            cached_tokens=cached * self.chunk_size,
            no_space=no_space,
        )

    def _retrieve(self, req: Retrieve) -> Reply:
        engine = self.registry.get(req.instance_id)
        transfer = engine.require_transfer()
        keys, ids = self._chunk_keys(engine, req)
        block_size = engine.layout.block_size
        if (
            req.skip_tokens < 0
            or req.skip_tokens % block_size
            or req.skip_tokens > req.end - req.start
        ):
            raise BadRequestError(
                f"skip_tokens={req.skip_tokens} must be a multiple of the block size "
                f"({block_size}) within the range"
            )
        start = time.perf_counter()
        lease = self.l1.acquire_all(keys, owner=f"retrieve:{req.request_id}")
        if lease is None:
            raise CacheMissError(
                f"chunks for tokens [{req.start}, {req.end}) of request {req.request_id[:200]!r} "
                "are not cached (evicted or cleared); recompute them"
            )
        # Our own pins now protect the chunks: the lookup's locks on them can go.
        self.sessions.release(req.request_id, keys)
        bpc = engine.blocks_per_chunk
        skip_blocks = req.skip_tokens // block_size
        try:
            for i, (offset, nbytes) in enumerate(lease.offsets(keys)):
                first = max(0, skip_blocks - i * bpc)
                if first >= bpc:
                    continue
                src = self.l1.view(offset, nbytes).reshape(engine.chunk_shape)
                transfer.scatter(src[:, :, first:], ids[i * bpc + first : (i + 1) * bpc])
        finally:
            intact = self.l1.release(lease)
        if not intact:
            raise TransferError("the cache was cleared during the retrieve; recompute")
        elapsed = time.perf_counter() - start
        tokens = req.end - req.start - req.skip_tokens
        logger.info("Retrieved %d tokens in %.3f seconds", tokens, elapsed)
        self.metrics.retrieved_tokens.inc(tokens)
        self.metrics.retrieved_bytes.inc(
            tokens // block_size * engine.layout.block_bytes * engine.layout.num_layers
        )
        return RetrieveReply(id=req.id, retrieved_tokens=tokens)

    # ----- worker copies (lmcache_driven) ------------------------------------------------------

    def _prepare_store(self, req: PrepareStore) -> Reply:
        engine = self.registry.get(req.instance_id)
        return self.prepared.prepare_store(req, self._range_keys(engine, req), engine.chunk_bytes)

    def _prepare_retrieve(self, req: PrepareRetrieve) -> Reply:
        engine = self.registry.get(req.instance_id)
        keys = self._range_keys(engine, req)
        return self.prepared.prepare_retrieve(req, keys, engine.chunk_bytes)

    # ----- helpers ----------------------------------------------------------------------------

    def _token_count(self, tokens: bytes) -> int:
        if len(tokens) % TOKEN_BYTES:
            raise BadRequestError("tokens must be little-endian uint32 (a multiple of 4 bytes)")
        return len(tokens) // TOKEN_BYTES

    def _chunk_keys(self, engine: Engine, req: Store | Retrieve) -> tuple[list[ObjectKey], Any]:
        """Validate a store/retrieve and return its keys and block ids."""
        keys = self._range_keys(engine, req)
        blocks = (req.end - req.start) // engine.layout.block_size
        return keys, engine.check_block_ids(req.block_ids, blocks)

    def _range_keys(self, engine: Engine, req: RangeRequest) -> list[ObjectKey]:
        """Validate a chunk-aligned token range and return the keys of its chunks."""
        tokens, start, end, salt = req.tokens, req.start, req.end, req.cache_salt
        c = self.chunk_size
        if start < 0 or end < start or start % c or end % c:
            raise BadRequestError(
                f"token range [{start}, {end}) must be chunk-aligned (chunk size {c})"
            )
        if self._token_count(tokens) < end:
            raise BadRequestError(
                f"range ends at token {end} but only {len(tokens) // 4} tokens sent"
            )
        check_identity(engine.model_name, engine.world_size, engine.dtype, salt)
        digest = engine.namespace_digest(salt)
        hashes = self.hasher.hashes(tokens, end // c)[start // c :]
        return [object_key(digest, h) for h in hashes]
