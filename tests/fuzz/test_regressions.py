"""Regressions: server bugs that earlier versions of the fuzzers found, now fixed, each
pinned by a test that says what it was. They run on a server of their own
(``probe_server``), so that what they register and store does not meet the fuzzing, and
its log must stay free of tracebacks too. What is still broken is pinned by strict-xfail
tests, and the fuzzers accept only those exact deviations, each pointing at its test."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from lmcache.engine.shm_kv import ShmKVCache
from lmcache.protocol.codec import encode, error_reply
from lmcache.protocol.messages import (
    REQUEST_OPS,
    Commit,
    Committed,
    ErrorCode,
    ErrorReply,
    FreeLookup,
    LayerPlacement,
    Lookup,
    Ok,
    Ping,
    Pong,
    Prepared,
    PrepareRetrieve,
    PrepareStore,
    RegisterKV,
    Reply,
    Retrieve,
    RetrieveBytes,
    RetrieveReply,
    ShmMemory,
    Store,
    UnregisterKV,
    WorkerCopy,
    encode_tokens,
)
from lmcache.storage.shm_names import shm_path

from ..conftest import CHUNK, MODEL, ServerProcess, unique_tokens
from .corpus import chunk_bytes_of
from .values import other_layouts
from .wire import (
    BAD,
    BPC,
    COUNT_MAX,
    ENGINE_ID,
    FORBIDDEN,
    INT64_MAX,
    INT64_MIN,
    L1_BYTES,
    LARGE_REPRS_OK,
    MISS,
    SIZE_MAX,
    TOKENS_MAX,
    UINT64_MAX,
    UNKNOWN_ENGINE,
    Wire,
)

pytestmark = LARGE_REPRS_OK
_ids = itertools.count(1)


UNDECODABLE = {  # each carries id 5 before the part that no decoder reads
    "invalid-utf8-op": b"\x82\xa2id\x05\xa2op\xa2\xff\xfe",
    "invalid-utf8-field": b"\x83\xa2id\x05\xa2op\xa4ping\xaarequest_id\xa1\xff",
    "deep-nesting": b"\x83\xa2id\x05\xa2op\xa4ping\xa1x" + b"\x91" * 2000 + b"\xc0",
    "map-key": b"\x83\xa2id\x05\xa2op\xa4nope\x81\x01\x02\x03",  # {1: 2} as a key
}


@pytest.mark.parametrize("frame", UNDECODABLE.values(), ids=UNDECODABLE.keys())
def test_undecodable_frame_is_a_bad_request(probe_wire: Wire, frame: bytes) -> None:
    """Was: UnicodeDecodeError / RecursionError escaped decode_request; the loop's guard
    answered 'internal' and logged a traceback for every such frame."""
    reply = probe_wire.call(frame)
    assert isinstance(reply, ErrorReply) and reply.code == ErrorCode.BAD_REQUEST, reply
    assert reply.message.startswith(("malformed ", "unknown request type 'nope'")), reply
    assert isinstance(probe_wire.call(encode(Ping(id=6))), Pong)  # and it keeps serving


_NOT_ECHOED = pytest.mark.xfail(
    reason="known limitation: a frame nested past the decoder's recursion limit, or with a "
    "map as a key, cannot be read even leniently, so its id is not echoed (id -1)",
    strict=True,
)


@pytest.mark.parametrize(
    "frame",
    [
        pytest.param(f, id=k, marks=[_NOT_ECHOED] if k in ("deep-nesting", "map-key") else [])
        for k, f in UNDECODABLE.items()
    ],
)
def test_undecodable_frame_echoes_its_id(probe_wire: Wire, frame: bytes) -> None:
    reply = probe_wire.call(frame)
    assert isinstance(reply, ErrorReply) and reply.code == ErrorCode.BAD_REQUEST, reply
    assert reply.id == 5, reply


@pytest.mark.parametrize(
    "msg",
    [
        {"id": 5, "op": 3},
        {"id": 5, "op": ["ping"]},
        {"id": 5, "op": "nope", 1: 2},
        {"id": 5, "op": "nope", b"k": 2},
        {"id": 5, "op": "nope", None: 2},
        {"id": 5, "op": "ping", (1, 2): 2},
        {"id": UINT64_MAX, "op": "ping", "instance_id": "x"},
        {"id": "5", "op": "nope"},
        {"id": True, "op": "nope"},
        {"id": 5.0, "op": "ping"},
    ],
    ids=[
        "int-op", "list-op", "int-key", "bytes-key", "nil-key", "array-key", "uint64-id",
        "str-id", "bool-id", "float-id",
    ],
)  # fmt: skip
def test_envelope_survives_wrongly_typed_fields_and_keys(
    probe_wire: Wire, msg: dict[Any, Any]
) -> None:
    """Was: a non-int id, non-str op or non-str key made the envelope unreadable: id -1,
    and an unknown op not reported as such."""
    reply = probe_wire.call(msgspec.msgpack.encode(msg))
    assert isinstance(reply, ErrorReply) and reply.code == ErrorCode.BAD_REQUEST, reply
    assert reply.id == (msg["id"] if type(msg["id"]) is int else -1)
    op = msg["op"]
    if isinstance(op, str) and op not in REQUEST_OPS:
        assert reply.message == f"unknown request type {op!r}"
    elif isinstance(op, str):
        assert reply.message.startswith(f"malformed {op}: ")
    else:
        assert reply.message.startswith("malformed request: ")


def _bounded(cache: ShmKVCache, field: str, value: int) -> Any:
    """A request with ``value`` in ``field`` (and good values everywhere else)."""
    tokens = encode_tokens(unique_tokens(CHUNK))
    rng: dict[str, Any] = {
        "request_id": "b",
        "instance_id": ENGINE_ID,
        "tokens": tokens,
        "start": 0,
        "end": CHUNK,
    }
    store = Store(id=1, block_ids=list(range(BPC)), **rng)
    reg = RegisterKV(id=1, instance_id=9, rank=0, layout=cache.layout, memory=WorkerCopy(), **MODEL)
    r = msgspec.structs.replace
    layout: dict[str, Callable[[int], Any]] = {
        "num_layers": lambda v: r(reg, layout=r(cache.layout, num_layers=v)),
        "block_bytes": lambda v: r(reg, layout=r(cache.layout, block_bytes=v)),
        "block_stride": lambda v: r(reg, layout=r(cache.layout, num_blocks=1, block_stride=v)),
        "plane_stride": lambda v: r(
            reg, layout=r(cache.layout, planes=1, block_bytes=1024, plane_stride=v)
        ),
        "layer_offset": lambda v: r(
            reg, layout=r(cache.layout, layers=[LayerPlacement(0, v)] * 4)
        ),
        "rank": lambda v: r(reg, rank=v),
        "register_instance_id": lambda v: r(reg, instance_id=v),
        "block_id": lambda v: r(store, block_ids=[v] * BPC),
        "start": lambda v: r(store, start=v),
        "end": lambda v: r(store, end=v),
        "skip_tokens": lambda v: Retrieve(id=1, block_ids=list(range(BPC)), skip_tokens=v, **rng),
        "free_start": lambda v: FreeLookup(id=1, request_id="b", start=v),
        "world_size": lambda v: Lookup(
            id=1, request_id="b", tokens=tokens, **(MODEL | {"world_size": v})
        ),
        "ping_instance_id": lambda v: Ping(id=1, instance_id=v),
        "transfer_id": lambda v: Commit(id=1, instance_id=ENGINE_ID, transfer_id=v),
    }  # fmt: skip
    return layout[field](value)


COUNT, SIZE, TOKENS = (0, COUNT_MAX), (0, SIZE_MAX), (0, TOKENS_MAX)
ENGINE = (INT64_MIN, INT64_MAX)
BOUNDS = {
    "num_layers": COUNT, "rank": COUNT, "block_id": COUNT, "world_size": COUNT,
    "block_bytes": SIZE, "block_stride": SIZE, "plane_stride": SIZE, "layer_offset": SIZE,
    "start": TOKENS, "end": TOKENS, "skip_tokens": TOKENS, "free_start": TOKENS,
    "register_instance_id": ENGINE, "ping_instance_id": ENGINE, "transfer_id": ENGINE,
}  # fmt: skip


@pytest.mark.parametrize("field", BOUNDS)
def test_ints_are_bounded_when_decoded(
    probe_server: tuple[ServerProcess, ShmKVCache], probe_wire: Wire, field: str
) -> None:
    """Was: ints in [2**63, 2**64) overflowed numpy intp (block ids, layout strides) deep in
    a handler: 'internal' with a traceback. Now every int field has bounds, checked when the
    request is decoded: just outside them is a bad_request echoing the id; at them, not."""
    lo, hi = BOUNDS[field]
    outside = [v for v in (lo - 1, hi + 1, INT64_MAX + 1, UINT64_MAX) if v >= INT64_MIN]
    for value in outside:
        req = msgspec.structs.replace(_bounded(probe_server[1], field, value), id=next(_ids))
        reply = probe_wire.call(encode(req))
        assert isinstance(reply, ErrorReply) and reply.code == BAD, (value, reply)
        assert reply.id == req.id, reply
        assert reply.message.startswith(f"malformed {req.__struct_config__.tag}: "), reply
    for value in (lo, hi):
        req = msgspec.structs.replace(_bounded(probe_server[1], field, value), id=next(_ids))
        reply = probe_wire.call(encode(req))
        assert reply.id == req.id, reply
        if isinstance(reply, ErrorReply):  # refused by a handler, if at all: not when decoded
            assert reply.code in (BAD, MISS), (value, reply)
            assert not reply.message.startswith("malformed"), (value, reply)
        if isinstance(req, RegisterKV) and isinstance(reply, Ok):
            probe_wire.call(encode(UnregisterKV(id=next(_ids), instance_id=req.instance_id)))


def test_same_identity_other_layout_is_a_miss(
    probe_server: tuple[ServerProcess, ShmKVCache], probe_wire: Wire
) -> None:
    """Was: chunk keys ignored the layout, so an engine with the same identity but another
    layout read chunks of the wrong size: 'internal' (reshape), and prepare_retrieve handed
    out the wrong size. Now chunks carry the writer's layout: other layouts miss."""
    server, cache = probe_server
    client = server.client()
    half = other_layouts(cache.layout)[0]
    client.register(2, model_name="m", world_size=1, rank=0, dtype="bfloat16",
                    layout=half, memory=cache.memory)  # fmt: skip
    client.register(3, model_name="m", world_size=1, rank=0, dtype="bfloat16",
                    layout=cache.layout, memory=WorkerCopy())  # fmt: skip
    tokens = unique_tokens(CHUNK)
    assert client.store("half", 2, tokens, start=0, end=CHUNK, block_ids=range(16)).stored_tokens
    assert client.lookup("full", tokens, **MODEL) == CHUNK  # lookups do not know layouts
    span: dict[str, Any] = {"tokens": encode_tokens(tokens), "start": 0, "end": CHUNK}
    for req in (
        Retrieve(id=11, request_id="full", instance_id=ENGINE_ID, block_ids=[*range(16)], **span),
        RetrieveBytes(id=12, request_id="full", instance_id=ENGINE_ID, **span),
        PrepareRetrieve(id=13, request_id="full", instance_id=3, **span),
    ):  # fmt: skip
        reply = probe_wire.call(encode(req))
        assert isinstance(reply, ErrorReply) and reply.code == MISS, reply
        assert reply.id == req.id
        if not isinstance(req, PrepareRetrieve):
            assert "another layout" in reply.message, reply
    client.end_session("full")
    # The writer's own layout still reads its chunks.
    same = Retrieve(id=14, request_id="half", instance_id=2, block_ids=list(range(16)), **span)
    assert probe_wire.call(encode(same)) == RetrieveReply(14, CHUNK)
    for iid in (2, 3):
        client.unregister(iid)
    with server.http() as http:
        l1 = http.get("/status").json()["l1"]
    assert l1["leases"] == 0 and l1["locked"] == 0, l1


@pytest.mark.parametrize("how", ["store", "store_bytes", "prepare_store"])
def test_a_chunk_cached_under_another_layout_is_not_reported_cached(
    probe_server: tuple[ServerProcess, ShmKVCache], how: str
) -> None:
    """Was: reserve_write ignored the layout tag, so an engine of the same identity but
    another layout was told "cached" for chunks it could never retrieve. Now that is a
    conflict: nothing is stored or reported cached, and the server logs a warning once."""
    server, cache = probe_server
    client = server.client()
    half = other_layouts(cache.layout)[0]  # the real layout, half the bytes a block
    memory = WorkerCopy() if how == "prepare_store" else cache.memory
    client.register(2, model_name="m", world_size=1, rank=0, dtype="bfloat16",
                    layout=half, memory=memory)  # fmt: skip
    tokens = unique_tokens(CHUNK)
    try:
        client.store("real", ENGINE_ID, tokens, start=0, end=CHUNK, block_ids=range(16))
        if how == "store":
            reply = client.store(how, 2, tokens, start=0, end=CHUNK, block_ids=range(16))
            assert (reply.stored_tokens, reply.cached_tokens, reply.conflict_tokens) == (
                0,
                0,
                CHUNK,
            )
        elif how == "store_bytes":
            chunk = bytes(chunk_bytes_of(half))
            reply = client.store_bytes(how, 2, tokens, start=0, end=CHUNK, chunks=[chunk])
            assert (reply.stored_tokens, reply.cached_tokens, reply.conflict_tokens) == (
                0,
                0,
                CHUNK,
            )
        else:
            prepared = client.prepare_store(how, 2, tokens, start=0, end=CHUNK)
            assert prepared.offsets == [-1]  # nothing for this engine to write
            assert client.commit(2, prepared.transfer_id) == 0
    finally:
        client.unregister(2)
    assert "stores chunks already cached with another layout" in server.log()


def test_layouts_bigger_than_the_pool_are_refused(
    probe_server: tuple[ServerProcess, ShmKVCache], probe_wire: Wire
) -> None:
    """Was: worker-copy layouts were unbounded, so chunk_bytes could exceed what msgpack
    carries: the Prepared reply failed to encode and the client got 'internal' with id -1.
    Now a layout whose chunk does not fit in the L1 pool is refused at registration."""
    r = msgspec.structs.replace
    good = probe_server[1].layout

    def register_as(iid: int, **fields: int) -> Reply:
        req = RegisterKV(
            id=next(_ids), instance_id=iid, rank=0, layout=r(good, **fields), memory=WorkerCopy(),
            **MODEL,
        )  # fmt: skip
        reply = probe_wire.call(encode(req))
        assert reply.id == req.id, reply
        return reply

    def prepare(iid: int) -> Reply:
        req = PrepareStore(
            id=next(_ids), request_id="huge", instance_id=iid,
            tokens=encode_tokens(unique_tokens(CHUNK)), start=0, end=CHUNK,
        )  # fmt: skip
        reply = probe_wire.call(encode(req))
        assert reply.id == req.id, reply
        return reply

    for fields in (
        {"num_layers": COUNT_MAX, "block_bytes": SIZE_MAX},  # 2**83 bytes a chunk
        {"num_layers": 1, "block_bytes": L1_BYTES // BPC + 2},  # just over the pool
    ):
        reply = register_as(3, **fields)
        assert isinstance(reply, ErrorReply) and reply.code == BAD, reply
        assert "larger than the L1 pool" in reply.message, reply
        reply = prepare(3)
        assert isinstance(reply, ErrorReply) and reply.code == UNKNOWN_ENGINE, reply
    reply = register_as(3, num_layers=2**40, block_bytes=2**40)  # past the bounds: not decoded
    assert isinstance(reply, ErrorReply) and reply.message.startswith("malformed register: ")

    assert isinstance(register_as(3, num_layers=1, block_bytes=L1_BYTES // BPC), Ok)  # fits
    prepared = prepare(3)
    assert isinstance(prepared, Prepared) and prepared.chunk_bytes == L1_BYTES, prepared
    abort = Commit(id=next(_ids), instance_id=3, transfer_id=prepared.transfer_id, success=False)
    assert probe_wire.call(encode(abort)) == Committed(abort.id, 0)
    probe_wire.call(encode(UnregisterKV(id=next(_ids), instance_id=3)))


def test_commit_is_bound_to_the_preparing_engine(
    probe_server: tuple[ServerProcess, ShmKVCache], probe_wire: Wire
) -> None:
    """Transfer ids are random and only the engine that prepared a transfer can finish it."""
    server, cache = probe_server
    client = server.client()
    for iid in (5, 6):
        client.register(iid, model_name="m", world_size=1, rank=0, dtype="bfloat16",
                        layout=cache.layout, memory=WorkerCopy())  # fmt: skip
    tokens = unique_tokens(4 * CHUNK)
    tids = [
        client.prepare_store(f"t{i}", 5, tokens, start=i * CHUNK, end=(i + 1) * CHUNK).transfer_id
        for i in range(4)
    ]
    assert len(set(tids)) == 4 and all(0 <= t <= INT64_MAX for t in tids), tids
    assert max(tids) - min(tids) > 1000, f"guessable transfer ids: {tids}"
    for intruder in (6, ENGINE_ID, -5, 7):
        req = Commit(id=next(_ids), instance_id=intruder, transfer_id=tids[0])
        reply = probe_wire.call(encode(req))
        assert reply == error_reply(req.id, BAD, f"unknown or expired transfer {tids[0]}")
    assert client.commit(5, tids[0]) == CHUNK  # the intruders did not consume it
    for tid in tids[1:]:
        assert client.commit(5, tid, success=False) == 0
    missing = {"id": 40, "op": "commit", "transfer_id": tids[0]}  # no instance_id
    reply = probe_wire.call(msgspec.msgpack.encode(missing))
    assert isinstance(reply, ErrorReply) and reply.code == BAD and reply.id == 40, reply
    assert reply.message.startswith("malformed commit: ")
    for iid in (5, 6):
        client.unregister(iid)
    with server.http() as http:
        assert http.get("/status").json()["prepared_transfers"] == 0


def test_segments_are_mapped_only_with_their_seal(
    probe_server: tuple[ServerProcess, ShmKVCache], probe_wire: Wire
) -> None:
    server, cache = probe_server
    name, seal = cache.memory.segments[0], cache.memory.tokens[0]
    pong = server.client().ping()
    unsealed = f"lmcache_probe_unsealed_{os.getpid()}"
    Path(shm_path(unsealed)).write_bytes(bytes(2 * cache.segment.size))
    try:
        for segments, tokens, why in (
            ([name], ["00" * 16], "its seal does not match"),
            ([name], [seal[:-2]], "its seal does not match"),
            ([name], [], "one seal per segment"),
            ([name], [seal, seal], "one seal per segment"),
            ([name], ["not hex"], "is not hex"),
            ([pong.l1_pool], [pong.l1_pool_seal], "not an engine KV segment"),  # the pool
            ([unsealed], [seal], "not an engine KV segment"),
        ):
            memory = ShmMemory(segments=segments, tokens=tokens)
            req = RegisterKV(
                id=next(_ids), instance_id=8, rank=0, layout=cache.layout, memory=memory, **MODEL
            )
            reply = probe_wire.call(encode(req))
            code = FORBIDDEN if "not an engine" in why else BAD
            assert isinstance(reply, ErrorReply) and reply.code == code, (memory, reply)
            assert why in reply.message and reply.id == req.id, (memory, reply)
            assert not server.client().ping(instance_id=8).engine_registered
    finally:
        Path(shm_path(unsealed)).unlink()
    no_tokens = {
        "id": 41, "op": "register", "instance_id": 8, "rank": 0, **MODEL,
        "layout": msgspec.to_builtins(cache.layout), "memory": {"type": "shm", "segments": [name]},
    }  # fmt: skip
    reply = probe_wire.call(msgspec.msgpack.encode(no_tokens))
    assert isinstance(reply, ErrorReply) and reply.code == BAD and reply.id == 41, reply
    req = RegisterKV(
        id=next(_ids), instance_id=8, rank=0, layout=cache.layout, memory=cache.memory, **MODEL
    )
    assert probe_wire.call(encode(req)) == Ok(req.id)
    probe_wire.call(encode(UnregisterKV(id=next(_ids), instance_id=8)))


def test_data_frames_on_other_requests_are_refused(probe_wire: Wire) -> None:
    reply = probe_wire.call(encode(Ping(id=42, instance_id=ENGINE_ID)), b"x")
    assert reply == error_reply(42, BAD, "ping takes no data frames")
    reply = probe_wire.call(b"\xc1", b"x")  # an undecodable frame: its own error
    assert isinstance(reply, ErrorReply) and reply.code == BAD and reply.id == -1


def test_probe_server_logged_no_traceback(probe_server: tuple[ServerProcess, ShmKVCache]) -> None:
    log = probe_server[0].log()
    assert "Traceback" not in log, f"the server logged an unexpected exception:\n{log[-5000:]}"
