"""Fuzzing the KV event messages (protocol 3) against a real server that keeps a log:
`poll_kv_events` with hostile cursors and limits, and stores with hostile ``want_keys``.
Each message gets exactly one typed reply: the codec's own verdict when it does not
decode, otherwise an answer that keeps the log's promises (records after the cursor, in
order, at most ``limit``; keys only when asked). The server stays healthy throughout."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lmcache.engine.shm_kv import ShmKVCache
from lmcache.protocol.codec import decode_request
from lmcache.protocol.messages import (
    MAX_KV_EVENTS,
    ErrorReply,
    KVEvents,
    StoreReply,
    encode_tokens,
)

from ..conftest import CHUNK, ServerProcess, start_server, unique_tokens
from .values import fuzz, ints
from .wire import ENGINE_ID, Wire

_ids = itertools.count(1)
HOSTILE = st.one_of(
    ints(), st.none(), st.booleans(), st.floats(), st.text(max_size=8), st.binary(max_size=8)
)


@pytest.fixture(scope="module")
def fuzz_server() -> Iterator[ServerProcess]:
    """This module's server keeps a KV event log of 16 records (the conftest's `wire` and
    `kv` fixtures then talk to and register with this one)."""
    s = start_server("--kv-event-log-size", "16")
    yield s
    s.stop()


@pytest.fixture(scope="module", autouse=True)
def records(fuzz_server: ServerProcess, kv: ShmKVCache) -> None:
    """Records to page through: 12 stores of 2 chunks each, so the ring (16) wraps."""
    client = fuzz_server.client()
    for _ in range(12):
        client.store(
            "seed", ENGINE_ID, unique_tokens(2 * CHUNK), start=0, end=2 * CHUNK, block_ids=range(32)
        )


def _exchange(wire: Wire, msg: dict[str, Any]) -> tuple[Any, Any]:
    """Send ``msg``; return (what the codec makes of it, the server's reply)."""
    frame = msgspec.msgpack.encode(msg)
    with wire.fresh_on_failure():
        reply = wire.call(frame)
        wire.assert_quiet()
    return decode_request(frame), reply


@fuzz(200)
@given(after=st.one_of(HOSTILE, st.integers(0, 40)), limit=st.one_of(HOSTILE, st.integers(1, 8)))
def test_polls_with_hostile_cursors_and_limits(wire: Wire, after: Any, limit: Any) -> None:
    msg = {"id": next(_ids), "op": "poll_kv_events", "after": after, "limit": limit}
    verdict, reply = _exchange(wire, msg)
    if isinstance(verdict, ErrorReply):
        assert reply == verdict  # exactly the codec's bad_request
        return
    assert isinstance(reply, KVEvents) and reply.id == msg["id"] and reply.enabled
    assert len(reply.records) <= min(limit, MAX_KV_EVENTS)
    seqs = [r.seq for r in reply.records]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert all(r.kind in ("stored", "removed") and len(r.key) == 48 for r in reply.records)
    if seqs and not reply.lost:
        assert seqs[0] > after and reply.next == seqs[-1]


@fuzz(60)
@given(want_keys=HOSTILE, salt=st.sampled_from(["", "t"]))
def test_stores_with_hostile_want_keys(wire: Wire, want_keys: Any, salt: str) -> None:
    msg = {
        "id": next(_ids), "op": "store", "request_id": "f", "instance_id": ENGINE_ID,
        "tokens": encode_tokens(unique_tokens(CHUNK)), "start": 0, "end": CHUNK,
        "block_ids": list(range(16)), "cache_salt": salt, "want_keys": want_keys,
    }  # fmt: skip
    verdict, reply = _exchange(wire, msg)
    if isinstance(verdict, ErrorReply):
        assert reply == verdict
        return
    assert isinstance(reply, StoreReply), reply
    assert len(reply.keys) == (1 if want_keys is True else 0)


def test_the_server_is_healthy_after_the_fuzzing(fuzz_server: ServerProcess, wire: Wire) -> None:
    status = fuzz_server.status()
    assert status["healthy"] and status["kv_events"]["records"] <= 16
    reply = wire.call(msgspec.msgpack.encode({"id": 1, "op": "poll_kv_events"}))
    assert isinstance(reply, KVEvents) and reply.records
    assert "Traceback" not in fuzz_server.log()
