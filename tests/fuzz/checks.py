"""What every reply must be: exactly the codec's verdict for a request that does not
decode (an int past its bound, a bad data frame count), otherwise one of the types and
error codes `ALLOWED` for its request, with sane numbers (store accounting, chunk sizes,
offsets inside the pool, transfer ids), and bookkeeping in the corpus of what the reply
opened or closed (engines, prepared transfers, lookup sessions)."""

from __future__ import annotations

import functools
from typing import Any

import msgspec
from hypothesis import event
from hypothesis.control import currently_in_test_context

from lmcache.protocol.codec import MAX_ERROR_MESSAGE, decode_request, encode, error_reply
from lmcache.protocol.messages import (
    PROTOCOL_VERSION,
    ChunkData,
    Clear,
    Commit,
    Committed,
    EndSession,
    ErrorReply,
    FreeLookup,
    KVEvents,
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
    ShmMemory,
    Store,
    StoreBytes,
    StoreReply,
    UnregisterKV,
)
from lmcache.storage.shm_names import shm_path

from ..conftest import CHUNK
from .corpus import Corpus, chunk_bytes_of
from .wire import (
    BAD,
    ENGINE_ID,
    FORBIDDEN,
    INT64_MAX,
    L1_BYTES,
    LOCK_TTL_S,
    MISS,
    TRANSFER_FAILED,
    UNKNOWN_ENGINE,
    Call,
    Wire,
)

# What each request that decodes may get back: (normal reply types, allowed error codes).
# "internal" is never allowed: it means an exception that the handler did not expect. A
# request that does not decode must get exactly the codec's bad_request (`check_reply`).
ALLOWED: dict[type[Any], tuple[tuple[type[Any], ...], frozenset[str]]] = {
    Ping: ((Pong,), frozenset()),
    RegisterKV: ((Ok,), frozenset({BAD, FORBIDDEN})),  # forbidden: not a KV segment name
    UnregisterKV: ((Ok,), frozenset()),
    Lookup: ((LookupReply,), frozenset({BAD})),
    QueryLookup: ((LookupReply,), frozenset()),
    FreeLookup: ((Ok,), frozenset({BAD})),
    Store: ((StoreReply,), frozenset({BAD, UNKNOWN_ENGINE})),
    Retrieve: ((RetrieveReply,), frozenset({BAD, UNKNOWN_ENGINE, MISS})),
    PrepareStore: ((Prepared,), frozenset({BAD, UNKNOWN_ENGINE})),
    PrepareRetrieve: ((Prepared,), frozenset({BAD, UNKNOWN_ENGINE, MISS})),
    Commit: ((Committed,), frozenset({BAD, TRANSFER_FAILED})),
    StoreBytes: ((StoreReply,), frozenset({BAD, UNKNOWN_ENGINE})),
    RetrieveBytes: ((ChunkData,), frozenset({BAD, UNKNOWN_ENGINE, MISS})),
    EndSession: ((Ok,), frozenset()),
    Clear: ((Ok,), frozenset()),
    PollKVEvents: ((KVEvents,), frozenset()),  # fuzzed in test_kv_events.py
}
assert set(ALLOWED) == set(Request.__args__), "a new request type needs an entry here"
DATA_OPS = (StoreBytes, RetrieveBytes)  # the only requests that take data frames
# Every request type but Clear, which would wipe the cache mid-run: it is tested once, below.


def harmless(req: Any) -> bool:
    """Requests the fuzzers must not send: a Clear, or touching the real engine's registration."""
    if isinstance(req, Clear):
        return False
    return not (isinstance(req, RegisterKV | UnregisterKV) and req.instance_id == ENGINE_ID)


def _undecodable(req: Any) -> ErrorReply | None:
    """The codec's verdict on ``req`` as sent: None when it decodes (within every bound)."""
    decoded = decode_request(encode(req))
    return decoded if isinstance(decoded, ErrorReply) else None


def _max_int(value: Any) -> int:
    """The largest int anywhere in ``value`` (plain data), or -1."""
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        return max(map(_max_int, value), default=-1)
    return value if type(value) is int else -1


def _seal_ok(corpus: Corpus, name: str, token: str) -> bool:
    try:
        return corpus.sealed.get(shm_path(name)) == bytes.fromhex(token)
    except ValueError:
        return False


def check_reply(
    corpus: Corpus, call: Call, reply: Reply, data: list[bytes], racing: bool = False
) -> None:
    """``reply`` (with ``data``) is a well-formed answer to ``call``: its id, an allowed type,
    sane numbers. ``racing``: other requests ran at the same time (pipelined)."""
    req = call.req
    kind = type(req).__name__
    op = req.__struct_config__.tag
    assert reply.id == req.id, f"{kind} {req.id} answered with id {reply.id}: {reply!r}"
    if currently_in_test_context():  # for --hypothesis-show-statistics
        event(f"{kind} -> {reply.code if isinstance(reply, ErrorReply) else type(reply).__name__}")
    undecodable = _undecodable(req)
    fields = msgspec.to_builtins(req)
    del fields["id"]  # the only int that may be any msgpack int
    if _max_int(fields) > INT64_MAX:
        assert undecodable is not None, "an int past int64 got by the decoder"
    if undecodable is not None:  # e.g. an int out of its bounds: refused when decoded
        assert reply == undecodable
        assert reply.message.startswith(f"malformed {op}: "), reply
        return
    if call.frames and not isinstance(req, DATA_OPS):
        assert reply == error_reply(req.id, BAD, f"{op} takes no data frames")
        return
    ok_types, codes = ALLOWED[type(req)]
    if isinstance(reply, ErrorReply):
        if (
            racing
            and isinstance(req, Store | Retrieve)
            and reply.code == TRANSFER_FAILED
            and "unregistered during the copy" in reply.message
        ):
            return  # the engine was unregistered (or registered again) while its copy ran
        assert reply.code in codes, f"{kind} got {reply.code!r}: {reply.message}"
        assert 0 < len(reply.message) <= MAX_ERROR_MESSAGE
        if isinstance(req, Commit) and reply.code == TRANSFER_FAILED:
            corpus.transfers.pop(req.transfer_id, None)
        return
    assert isinstance(reply, ok_types), f"{kind} got {reply!r}"
    # Deferred copies look their engine up when they run, maybe after a later registration.
    chunk_bytes = None if racing else corpus.chunk_bytes(getattr(req, "instance_id", None))
    _check_result(corpus, call, reply, data, chunk_bytes)


def _check_store_accounting(req: Any, reply: StoreReply) -> None:
    """Every chunk of the range is stored, cached, a layout conflict, or cut by no_space."""
    assert reply.stored_tokens % CHUNK == 0 and reply.cached_tokens % CHUNK == 0
    assert reply.conflict_tokens % CHUNK == 0
    accounted = reply.stored_tokens + reply.cached_tokens + reply.conflict_tokens
    assert 0 <= accounted <= req.end - req.start
    if not reply.no_space:
        assert accounted == req.end - req.start


def _check_result(
    corpus: Corpus, call: Call, reply: Reply, data: list[bytes], chunk_bytes: int | None
) -> None:
    """The numbers in a normal reply; ``chunk_bytes``: the engine's, when known."""
    req = call.req
    if isinstance(reply, Pong):
        assert reply.chunk_size == CHUNK and reply.protocol == PROTOCOL_VERSION
        assert reply.l1_pool == corpus.pool and reply.l1_pool_seal == corpus.pool_seal
        if req.instance_id == ENGINE_ID:
            assert reply.engine_registered
    elif isinstance(req, RegisterKV):
        lay = req.layout
        assert lay.block_size > 0 and CHUNK % lay.block_size == 0, lay
        assert chunk_bytes_of(lay) <= L1_BYTES, "a chunk bigger than the L1 pool was accepted"
        if isinstance(req.memory, ShmMemory):
            mem = req.memory
            assert len(mem.segments) == len(mem.tokens), mem
            assert all(map(functools.partial(_seal_ok, corpus), mem.segments, mem.tokens)), mem
        corpus.engines[req.instance_id] = lay
    elif isinstance(req, UnregisterKV):
        corpus.engines.pop(req.instance_id, None)
    elif isinstance(reply, LookupReply):
        assert reply.hit_tokens is not None and reply.hit_tokens % CHUNK == 0 <= reply.hit_tokens
        if isinstance(req, Lookup):
            assert reply.hit_tokens <= len(req.tokens) // 4
    elif isinstance(reply, StoreReply):
        _check_store_accounting(req, reply)
        if isinstance(req, StoreBytes):
            assert len(call.frames) == (req.end - req.start) // CHUNK
            assert chunk_bytes is None or all(size == chunk_bytes for size, _ in call.frames)
    elif isinstance(reply, RetrieveReply):
        assert reply.retrieved_tokens == req.end - req.start - req.skip_tokens
    elif isinstance(reply, ChunkData):
        assert reply.chunks == (req.end - req.start) // CHUNK == len(data), reply
        assert all(len(frame) == reply.chunk_bytes for frame in data), reply
        assert chunk_bytes is None or reply.chunk_bytes == chunk_bytes, reply
    elif isinstance(reply, Prepared):
        assert 0 <= reply.transfer_id <= INT64_MAX, reply
        corpus.transfers[reply.transfer_id] = req.instance_id
        chunks = (req.end - req.start) // CHUNK
        assert reply.ttl_s == LOCK_TTL_S and reply.chunk_bytes > 0
        assert chunk_bytes is None or reply.chunk_bytes == chunk_bytes, reply
        assert len(reply.offsets) == chunks or (reply.no_space and len(reply.offsets) < chunks)
        for offset in reply.offsets:
            assert offset == -1 or 0 <= offset <= L1_BYTES - reply.chunk_bytes, reply
        if isinstance(req, PrepareRetrieve):
            assert -1 not in reply.offsets and not reply.no_space
    elif isinstance(reply, Committed):
        assert reply.tokens >= 0 and reply.tokens % CHUNK == 0
        assert req.success or reply.tokens == 0
        assert corpus.transfers.pop(req.transfer_id) == req.instance_id


def note_sessions(corpus: Corpus, req: Any) -> None:
    if isinstance(req, Lookup):
        corpus.lookup_ids.add(req.request_id)


def exchange(wire: Wire, corpus: Corpus, call: Call | Any) -> Reply:
    call = call if isinstance(call, Call) else Call(call)
    note_sessions(corpus, call.req)
    wire.send(encode(call.req), *call.data())
    reply, data = wire.recv()
    check_reply(corpus, call, reply, data)
    return reply
