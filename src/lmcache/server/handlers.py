"""Request handlers: what the server does for each message type, and where.

`RequestHandler.routes` says, per request type, which handler serves it and where it
runs: on the socket loop (cheap and bounded: ping, lookups, locks, registration,
commits) or on the worker pool (anything that moves data, or a prepare long enough to
hold the loop up). `dispatch` answers loop requests at once and hands pool requests to
the transport as a `Deferred`. Every failure becomes a typed `ErrorReply`; nothing escapes.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lmcache import __version__
from lmcache.errors import BadRequestError, ServerError
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
    PollKVEvents,
    Pong,
    PrepareRetrieve,
    PrepareStore,
    QueryLookup,
    RegisterKV,
    Reply,
    Request,
    Retrieve,
    RetrieveBytes,
    Store,
    StoreBytes,
    UnregisterKV,
)
from lmcache.server.access import AccessPolicy
from lmcache.server.copies import Copies
from lmcache.server.kv_event_log import KVEventLog, disabled
from lmcache.server.metrics import Metrics
from lmcache.server.reaper import EngineReaper
from lmcache.server.registry import EngineRegistry, check_identity
from lmcache.server.sessions import Session, Sessions, Tail
from lmcache.server.tiers import TieredStore
from lmcache.server.worker_copy import PreparedTransfers
from lmcache.storage.chunk_store import ChunkLayout, ChunkStore
from lmcache.storage.keys import TOKEN_BYTES, shares_kv
from lmcache.storage.keyspace import KeySpace
from lmcache.storage.l1 import Lease
from lmcache.transport.peers import IN_PROCESS, Peer, Trust
from lmcache.transport.zmq_server import Deferred, Outcome

logger = logging.getLogger("lmcache.server")

# Prepared transfers longer than this many chunks run on the worker pool: measured, a
# 2M-token prepare_store held the loop 125 ms; 64 chunks take about 1 ms.
_LOOP_CHUNKS = 64


class Runs(enum.Enum):
    """Where a request type is served."""

    LOOP = "loop"  # cheap and bounded: answered on the socket loop, in arrival order
    POOL = "pool"  # moves data, or may take long: on the worker pool, the loop goes on


@dataclass(frozen=True, slots=True)
class Call:
    """What a handler may know beside the request: who sent it, and its data frames."""

    peer: Peer
    data: list[memoryview]


@dataclass(frozen=True, slots=True)
class Route:
    serve: Callable[[Any, Call], Outcome]
    runs: Runs
    takes_data: bool = False  # data frames are part of the request (else: bad_request)
    long: Callable[[Any], bool] | None = None  # a LOOP request this long goes to the pool


def _plain(handler: Callable[[Any], Outcome]) -> Callable[[Any, Call], Outcome]:
    return lambda req, _call: handler(req)


class RequestHandler:
    def __init__(
        self,
        *,
        store: ChunkStore,
        keys: KeySpace,
        registry: EngineRegistry,
        sessions: Sessions,
        metrics: Metrics,
        server_token: str,
        lock_ttl: float,
        pool_name: str = "",
        pool_seal: str = "",
        local_endpoint: str = "",
        tiers: TieredStore | None = None,
        kv_events: KVEventLog | None = None,
    ) -> None:
        self.store = store
        self.kv_events = kv_events
        self.keys = keys
        self.registry = registry
        self.sessions = sessions
        self.chunk_size = keys.chunk_size
        self.metrics = metrics
        self.server_token = server_token
        self.lock_ttl = lock_ttl
        self.pool_name = pool_name
        self.pool_seal = pool_seal
        self.local_endpoint = local_endpoint
        self.access = AccessPolicy(registry)
        self.prepared = PreparedTransfers(store, sessions, metrics, self.chunk_size, lock_ttl)
        self.tiers = tiers
        self.copies = Copies(store, keys, registry, sessions, metrics)
        self.reaper = EngineReaper(registry, sessions, self.prepared)
        loop, pool = Runs.LOOP, Runs.POOL
        self.routes: dict[type[Request], Route] = {
            Ping: Route(lambda req, call: self._ping(req, call.peer), loop),
            RegisterKV: Route(lambda req, call: self._register(req, call.peer), loop),
            UnregisterKV: Route(_plain(self._unregister), loop),
            Lookup: Route(lambda req, call: self._lookup(req, call.peer.pid), loop),
            QueryLookup: Route(_plain(self._query_lookup), loop),
            FreeLookup: Route(_plain(self._free_lookup), loop),
            EndSession: Route(_plain(self._end_session), loop),
            Clear: Route(_plain(self._clear), loop),
            PollKVEvents: Route(_plain(self._poll_kv_events), loop),
            PrepareStore: Route(_plain(self._prepare_store), loop, long=self._long_range),
            PrepareRetrieve: Route(_plain(self._prepare_retrieve), loop, long=self._long_range),
            Commit: Route(_plain(self.prepared.commit), loop),
            Store: Route(_plain(self.copies.store_blocks), pool),
            Retrieve: Route(_plain(self.copies.retrieve_blocks), pool),
            StoreBytes: Route(
                lambda req, call: self.copies.store_bytes(req, call.data), pool, takes_data=True
            ),
            RetrieveBytes: Route(_plain(self.copies.retrieve_bytes), pool),
        }

    def _long_range(self, req: PrepareStore | PrepareRetrieve) -> bool:
        # Hashing and reserving a long range would hold up the loop: measured, a 2M-token
        # prepare_store held it 125 ms; 64 chunks take about 1 ms.
        return req.end - req.start > _LOOP_CHUNKS * self.chunk_size

    # ----- dispatch -------------------------------------------------------------------

    def dispatch(
        self, req: Request, data: list[memoryview] | None = None, peer: Peer = IN_PROCESS
    ) -> Outcome | Deferred:
        """Answer a LOOP request now; return a POOL request's work as a `Deferred`.
        ``data``: raw data frames; ``peer``: who sent it, as its connection authenticated
        (see `access`)."""
        denied = self.access.check(req, peer)
        if denied is not None:
            refused = str(req.__struct_config__.tag)
            logger.warning("%s request %d refused: %s", refused, req.id, denied)
            self.metrics.observe_request(refused, ErrorCode.FORBIDDEN.value, 0.0)
            return error_reply(req.id, ErrorCode.FORBIDDEN, denied)
        req = self.access.scoped(req, peer)
        route = self.routes[type(req)]  # every decodable request type has a route
        if data and not route.takes_data:
            op = req.__struct_config__.tag
            return error_reply(req.id, ErrorCode.BAD_REQUEST, f"{op} takes no data frames")
        call = Call(peer, data or [])
        if route.runs is Runs.POOL or (route.long is not None and route.long(req)):
            return Deferred(lambda: self._run(route.serve, req, call))
        return self._run(route.serve, req, call)

    def _run(self, serve: Callable[[Any, Call], Outcome], req: Request, call: Call) -> Outcome:
        op = str(req.__struct_config__.tag)
        start = time.perf_counter()
        outcome = "ok"
        try:
            return serve(req, call)
        except ServerError as exc:
            outcome = exc.code
            logger.warning("%s request %d rejected: %s", op, req.id, exc.message)
            return error_reply(req.id, ErrorCode(exc.code), exc.message)
        except Exception as exc:
            outcome = ErrorCode.INTERNAL.value
            logger.exception("%s request %d failed", op, req.id)
            return error_reply(req.id, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        finally:
            self.metrics.observe_request(op, outcome, time.perf_counter() - start)

    # ----- control --------------------------------------------------------------------

    def _ping(self, req: Ping, peer: Peer) -> Reply:
        local = peer.is_local
        return Pong(
            id=req.id,
            server_token=self.server_token,
            chunk_size=self.chunk_size,
            version=__version__,
            engine_registered=self.registry.touch(req.instance_id, peer.owner),
            l1_pool=self.pool_name if local else "",
            l1_pool_seal=self.pool_seal if local else "",
            local_endpoint=self.local_endpoint,
            trusted=peer.trust is not Trust.NONE,
        )

    def _register(self, req: RegisterKV, peer: Peer) -> Reply:
        engine = self.registry.register(req, owner=peer.owner, pid=peer.pid)
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
        removed = self.store.clear()
        logger.info("Cleared %d chunks from L1", removed)
        return Ok(id=req.id)

    def _poll_kv_events(self, req: PollKVEvents) -> Reply:
        if self.kv_events is None:
            return disabled(req, self.server_token)
        return self.kv_events.poll(req)

    # ----- dead and silent engines -------------------------------------------------------

    def reap(self, idle_s: float) -> list[str]:
        """See `EngineReaper.reap` (the server's runtime calls this every second)."""
        return self.reaper.reap(idle_s)

    # ----- lookups ----------------------------------------------------------------------

    def _lookup(self, req: Lookup, pid: int | None = None) -> Reply:
        check_identity(req.model_name, req.world_size, req.dtype, req.cache_salt)
        if not req.request_id:
            raise BadRequestError("request_id must not be empty")
        if req.block_size and self.chunk_size % req.block_size:
            raise BadRequestError(
                f"block_size {req.block_size} must divide the chunk size {self.chunk_size}"
            )
        # Hash first, then pin under L1's lock: hashing (~2 us a chunk, free for a prompt
        # seen recently) must not hold up the copies that need the lock too.
        digests = self.keys.rank_digests(
            req.model_name, req.world_size, req.dtype, req.kv_spec, req.cache_salt
        )
        groups = self.keys.prompt_keys(digests, req.tokens)
        num_tokens = len(req.tokens) // TOKEN_BYTES
        lease = self.store.hold_prefix(groups, owner=req.request_id, ttl=self.lock_ttl)
        self.metrics.lookup_requested_tokens.inc(num_tokens)
        # Split now: once a prefetch runs, it pins more groups into the same lease.
        held, rest = groups[: lease.hit_groups], groups[lease.hit_groups :]
        layouts = self._l2_layouts(req) if rest else None

        def probe(chunk: int) -> Tail | None:
            return self._hold_tail(req, digests, lease, chunk)

        model, asked = req.model_name, num_tokens  # for the metrics
        if layouts is None or self.tiers is None:
            session = self.sessions.start(
                req.request_id, lease, held, pid=pid, tail=probe(len(held)),
                model_name=model, requested_tokens=asked,
            )  # fmt: skip
            self._count_hit(session)
            return LookupReply(id=req.id, hit_tokens=session.hit_tokens)
        job = self.tiers.prefetch(lease, rest, layouts, req.cache_salt)  # L1 missed: ask L2
        self.sessions.start(
            req.request_id, lease, held, prefetch=job, pid=pid, tail_probe=probe,
            model_name=model, requested_tokens=asked,
        )  # fmt: skip
        return LookupReply(id=req.id, hit_tokens=None)

    def _count_hit(self, session: Session) -> None:
        """Count a lookup whose hit just became known, split by the tier that held it."""
        l1_tokens, l1_keys, l2_keys = session.hit_split()
        self.metrics.lookup_done(
            session.model_name, requested=session.requested_tokens, l1_tokens=l1_tokens,
            hit=session.hit_tokens or 0, l1_keys=l1_keys, l2_keys=l2_keys,
        )  # fmt: skip

    def _hold_tail(
        self, req: Lookup, digests: list[bytes], lease: Lease, chunk: int
    ) -> Tail | None:
        """Pin the longest partial chunk (whole engine blocks) cached at whole-chunk position
        ``chunk``, where the whole-chunk hit ends. Partial chunks live in L1 only (see
        `ChunkStore`), so L1 is all there is to ask."""
        if not req.block_size:
            return None  # the engine did not say its block size: whole chunks only
        for tokens, group in self.keys.tail_groups(digests, req.tokens, chunk, req.block_size):
            if self.store.extend(lease, [group]) == 1:
                return tokens, group
        return None

    def _l2_layouts(self, req: Lookup) -> list[ChunkLayout] | None:
        """Every rank's chunk layout, if every rank's engine is registered (else no L2);
        rank 0's only for KV that every rank shares (one key per chunk, `shares_kv`)."""
        if self.tiers is None:
            return None
        engines = self.registry.find(req.model_name, req.world_size, req.dtype, req.kv_spec)
        if engines is None:
            return None
        if shares_kv(req.kv_spec):
            engines = engines[:1]
        return [e.chunk_layout for e in engines]

    def _query_lookup(self, req: QueryLookup) -> Reply:
        session = self.sessions.get(req.request_id)
        if session is None:
            logger.warning("lookup status asked for unknown request %r", req.request_id[:200])
            return LookupReply(id=req.id, hit_tokens=0)
        if self.sessions.poll(session):  # the L2 prefetch just finished: the hit is known
            self._count_hit(session)
        return LookupReply(id=req.id, hit_tokens=session.hit_tokens)

    def _free_lookup(self, req: FreeLookup) -> Reply:
        if req.start < 0 or (req.end is not None and req.end < req.start):
            raise BadRequestError(f"invalid token range [{req.start}, {req.end})")
        self.sessions.free_range(req.request_id, req.start, req.end)
        return Ok(id=req.id)

    def _end_session(self, req: EndSession) -> Reply:
        self.sessions.end(req.request_id)
        return Ok(id=req.id)

    # ----- worker copies (lmcache_driven) ------------------------------------------------------

    def _prepare_store(self, req: PrepareStore) -> Reply:
        engine = self.registry.get(req.instance_id)
        return self.prepared.prepare_store(req, self.copies.range_keys(engine, req), engine)

    def _prepare_retrieve(self, req: PrepareRetrieve) -> Reply:
        engine = self.registry.get(req.instance_id)
        keys = self.copies.range_keys(engine, req)
        return self.prepared.prepare_retrieve(req, keys, engine)
