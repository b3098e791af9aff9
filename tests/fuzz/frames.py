"""Frames that are not requests: garbage bytes (noise, and real requests truncated,
overwritten or with bytes after them), random msgpack maps (any id, any op, any fields of
any type, keys that are not strings), and maps that no decoder can read whatever its schema
(invalid UTF-8, nesting past any recursion limit, a map as a key), as raw msgpack."""

from __future__ import annotations

from typing import Any

import msgspec
from hypothesis import strategies as st

from lmcache.protocol.codec import encode
from lmcache.protocol.messages import (
    REQUEST_OPS,
    Commit,
    FreeLookup,
    KVLayout,
    LayerPlacement,
    Lookup,
    Ping,
    RegisterKV,
    Request,
    Retrieve,
    RetrieveBytes,
    ShmMemory,
    Store,
    StoreBytes,
)

from ..conftest import BLOCK, CHUNK, MODEL
from .values import ints
from .wire import ENGINE_ID

_SAMPLE_REQUESTS: list[Any] = [
    Ping(id=1, instance_id=ENGINE_ID),
    Lookup(id=2, request_id="r", tokens=bytes(range(16)), **MODEL),
    Store(
        id=3, request_id="r", instance_id=ENGINE_ID, tokens=bytes(4 * CHUNK),
        start=0, end=CHUNK, block_ids=list(range(16)),
    ),
    Retrieve(
        id=4, request_id="r", instance_id=ENGINE_ID, tokens=bytes(4 * CHUNK),
        start=0, end=CHUNK, block_ids=list(range(16)), skip_tokens=BLOCK,
    ),
    FreeLookup(id=5, request_id="r", start=0, end=None),
    RegisterKV(
        id=6, instance_id=7, rank=0, memory=ShmMemory(segments=["/nonexistent"], tokens=["00"]),
        layout=KVLayout(4, 64, BLOCK, 2048, 1024, [LayerPlacement(0, 0)] * 4, 2, 65536), **MODEL,
    ),
    Commit(id=7, instance_id=ENGINE_ID, transfer_id=1, success=False),
    StoreBytes(
        id=8, request_id="r", instance_id=ENGINE_ID, tokens=bytes(4 * CHUNK), start=0, end=CHUNK
    ),
    RetrieveBytes(
        id=9, request_id="r", instance_id=ENGINE_ID, tokens=bytes(4 * CHUNK), start=0, end=CHUNK
    ),
]  # fmt: skip
SAMPLE_FRAMES = [encode(r) for r in _SAMPLE_REQUESTS]


def _overwrite(frame: bytes, edits: list[tuple[int, int]]) -> bytes:
    buf = bytearray(frame)
    for pos, byte in edits:
        buf[pos % len(buf)] = byte
    return bytes(buf)


GARBAGE = st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=24).map(lambda b: b"\x82" + b),  # a map header, then noise
    st.tuples(st.sampled_from(SAMPLE_FRAMES), st.integers(0, 10_000)).map(
        lambda t: t[0][: t[1] % len(t[0])]  # truncated
    ),
    st.tuples(  # overwritten bytes: wrong types and lengths, invalid UTF-8 in strings...
        st.sampled_from(SAMPLE_FRAMES),
        st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4),
    ).map(lambda t: _overwrite(*t)),
    st.tuples(st.sampled_from(SAMPLE_FRAMES), st.binary(min_size=1, max_size=8)).map(
        lambda t: t[0] + t[1]  # trailing bytes
    ),
)

FIELD_NAMES = sorted(
    {name for kind in Request.__args__ for name in kind.__struct_fields__}
    | set(KVLayout.__struct_fields__)
    | {"segments", "tokens"}
)
ANY_VALUES = st.recursive(
    st.one_of(
        st.none(), st.booleans(), ints(), st.floats(), st.text(max_size=16), st.binary(max_size=16)
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
OP_NAMES = st.one_of(
    st.sampled_from(sorted(REQUEST_OPS - {"clear"})),
    st.sampled_from(
        ["", "error", "pong", "ok", "prepared", "chunk_data", "PING", "ping ", "Clear", "x" * 500]
    ),
    st.text(max_size=20),
)
OPS = st.one_of(OP_NAMES, ANY_VALUES)
ABSENT = object()  # a key the map leaves out (not a value: None is one)


@st.composite
def wire_maps(draw: st.DrawFn) -> dict[Any, Any]:
    msg: dict[Any, Any] = {}
    for key, values in (("id", st.one_of(ints(), ANY_VALUES)), ("op", OPS)):
        value = draw(st.one_of(values, st.just(ABSENT)) if draw(st.integers(0, 9)) == 0 else values)
        if value is not ABSENT:
            msg[key] = value
    extra_keys = st.one_of(
        st.sampled_from(FIELD_NAMES),
        st.text(max_size=12),
        st.integers(-3, 3),
        st.binary(max_size=3),
        st.none(),
        st.floats(allow_nan=False),
        st.tuples(st.integers(0, 3)),  # an array key
    ).filter(lambda k: k not in ("id", "op"))
    msg.update(draw(st.dictionaries(extra_keys, ANY_VALUES, max_size=5)))
    return msg


# Raw msgpack for what Python cannot encode: strings that are not UTF-8, maps as keys,
# nesting deeper than any decoder's recursion limit.
def _mp_str(raw: bytes) -> bytes:
    if len(raw) < 32:
        return bytes([0xA0 | len(raw)]) + raw
    return b"\xda" + len(raw).to_bytes(2, "big") + raw


INVALID_UTF8 = st.one_of(
    st.sampled_from([b"\xff", b"\xfe\xff", b"\xc3", b"\xed\xa0\x80", b"ping\x80", b"\xc0\xaf"]),
    st.binary(min_size=1, max_size=12).filter(lambda b: not _is_utf8(b)),
).map(_mp_str)
DEEP = st.tuples(
    st.one_of(st.sampled_from([2000, 3000, 100_000]), st.integers(2000, 5000)),
    st.sampled_from([b"\x91", b"\x81\xa1k"]),  # [[[...]]] or {"k": {"k": ...}}
).map(lambda t: t[1] * t[0] + b"\xc0")
MAP_KEY = st.sampled_from([b"\x81\x01\x02", b"\x80", b"\x81\xa1a\x90"])  # {1: 2}, {}, {"a": []}


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode()
    except UnicodeDecodeError:
        return False
    return True


def _mp(value: Any) -> bytes:
    return msgspec.msgpack.encode(value)


@st.composite
def poisoned_maps(draw: st.DrawFn) -> tuple[bytes, Any, Any]:
    """A msgpack map that no decoder can read, whatever its schema: an id (or not) and an
    op (or not), as plain entries, plus at least one poisoned entry, in any order. Returns
    (frame, id, op), where the op is ``ABSENT`` or the op's raw bytes when it is poisoned."""
    entries: list[bytes] = []
    msg_id = draw(st.one_of(ints(), st.just(ABSENT), ANY_VALUES))
    if msg_id is not ABSENT:
        entries.append(_mp("id") + _mp(msg_id))
    op: Any = draw(st.one_of(OP_NAMES.filter(lambda o: o != "clear"), st.just(ABSENT)))
    poisons: list[bytes] = []
    if op is not ABSENT and not draw(st.integers(0, 3)):
        op = draw(INVALID_UTF8)
        poisons.append(_mp("op") + op)
    elif op is not ABSENT:
        entries.append(_mp("op") + _mp(op))
    fields = st.sampled_from([f for f in FIELD_NAMES if f != "id"])  # one id, or none
    normal = st.tuples(fields, ANY_VALUES).map(lambda kv: _mp(kv[0]) + _mp(kv[1]))
    poisoned = st.one_of(
        st.tuples(fields.map(_mp), st.one_of(INVALID_UTF8, DEEP)),
        st.tuples(st.one_of(INVALID_UTF8, MAP_KEY), ANY_VALUES.map(_mp)),
    ).map(lambda kv: kv[0] + kv[1])
    poisons += draw(st.lists(poisoned, min_size=0 if poisons else 1, max_size=2))
    entries += poisons + draw(st.lists(normal, max_size=3))
    order = draw(st.permutations(range(len(entries))))
    frame = bytes([0x80 | len(entries)]) + b"".join(entries[i] for i in order)
    return frame, msg_id, op
