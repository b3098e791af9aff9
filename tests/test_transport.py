"""The ZMQ transport on both ends, in process, and lookups under concurrency on a real server."""

from __future__ import annotations

import threading
import time
import typing
from collections.abc import Iterator

import httpx
import msgspec
import numpy as np
import pytest
import zmq

from lmcache.client import LMCacheClient
from lmcache.engine.shm_kv import ShmKVCache
from lmcache.errors import ProtocolMismatchError, ServerUnavailableError
from lmcache.processes import free_port
from lmcache.protocol.codec import decode_reply, encode
from lmcache.protocol.messages import (
    PROTOCOL_VERSION,
    ChunkData,
    EndSession,
    ErrorReply,
    Lookup,
    LookupReply,
    Ok,
    Ping,
    Pong,
    Reply,
    Request,
    Store,
    StoreBytes,
)
from lmcache.server.build import build
from lmcache.server.handlers import RequestHandler, Runs
from lmcache.server.metrics import Metrics
from lmcache.server.registry import EngineRegistry
from lmcache.settings import ServerSettings
from lmcache.transport.base import MockTransport
from lmcache.transport.peers import Peer
from lmcache.transport.zmq_client import ZmqTransport
from lmcache.transport.zmq_server import Deferred, Frames, Outcome, ZmqServer

from .conftest import CHUNK, MODEL, ServerProcess, register, unique_tokens

SLOW = 999  # Ping(instance_id=SLOW) answers late, from the pool


class Echo:
    """A dispatch that answers pings on the loop and echoes data frames reversed, from the
    pool."""

    def __init__(self) -> None:
        self.threads: dict[str, set[str]] = {"loop": set(), "pooled": set()}

    def __call__(self, req: Request, data: Frames, peer: Peer) -> Outcome | Deferred:
        if isinstance(req, Ping) and req.instance_id != SLOW:
            self.threads["loop"].add(threading.current_thread().name)
            return Pong(id=req.id, server_token="t", chunk_size=1, version=str(req.instance_id))

        def work() -> Outcome:
            self.threads["pooled"].add(threading.current_thread().name)
            if isinstance(req, Ping):
                time.sleep(0.5)
                return Pong(id=req.id, server_token="late", chunk_size=1, version="late")
            frames = [bytes(d)[::-1] for d in data]
            return ChunkData(id=req.id, chunks=len(frames), chunk_bytes=len(frames[0])), frames

        return Deferred(work)


@pytest.fixture
def echo() -> Iterator[tuple[Echo, str]]:
    dispatch = Echo()
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    server = ZmqServer(endpoint, dispatch, max_workers=2)
    server.start()
    yield dispatch, endpoint
    server.stop()


def store_bytes(rid: int) -> StoreBytes:
    return StoreBytes(id=rid, request_id="r", instance_id=1, tokens=b"", start=0, end=0)


def test_inline_replies_on_the_loop_and_data_frames_through_the_pool(
    echo: tuple[Echo, str],
) -> None:
    dispatch, endpoint = echo
    client = ZmqTransport(endpoint)
    try:
        reply, frames = client.call(Ping(id=1, instance_id=5))
        assert isinstance(reply, Pong) and reply.version == "5" and frames == []
        big = np.random.default_rng(0).bytes(3 << 20)  # above pyzmq's copy threshold
        reply, frames = client.call(store_bytes(2), data=[big, b"small"])
        assert isinstance(reply, ChunkData) and reply.chunks == 2
        assert [bytes(f) for f in frames] == [big[::-1], b"llams"]
    finally:
        client.close()
    assert dispatch.threads["loop"] == {"lmcache-zmq-loop"}
    assert all(name.startswith("lmcache-worker") for name in dispatch.threads["pooled"])


def test_malformed_frames_get_typed_errors_echoing_the_id(echo: tuple[Echo, str]) -> None:
    _, endpoint = echo
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 5000)
    sock.connect(endpoint)
    try:
        for frames, want_id in [
            ([b""], -1),  # an empty header
            ([b"\xc1garbage"], -1),
            ([encode(Ping(id=41))[:-3]], -1),  # truncated
            ([encode(Ok(id=42))], 42),  # a reply type sent as a request
            ([b"\x82\xa2id\x2b\xa2op\xa4nope"], 43),  # {"id": 43, "op": "nope"}
        ]:
            sock.send_multipart(frames)
            parts = sock.recv_multipart()
            reply = decode_reply(parts[0])
            assert len(parts) == 1 and isinstance(reply, ErrorReply), frames
            assert reply.id == want_id and reply.code == "bad_request", reply
        # The loop is still serving.
        sock.send(encode(Ping(id=44, instance_id=1)))
        assert decode_reply(sock.recv()).id == 44
    finally:
        sock.close(linger=0)


def test_many_threads_each_get_their_own_replies(echo: tuple[Echo, str]) -> None:
    _, endpoint = echo
    errors: list[BaseException] = []

    def body(t: int) -> None:
        client = ZmqTransport(endpoint)
        try:
            for i in range(150):
                n = t * 1000 + i
                if i % 10 == 0:  # every tenth through the pool, with a data frame
                    reply, frames = client.call(store_bytes(n), data=[n.to_bytes(4, "big")])
                    assert reply.id == n and bytes(frames[0]) == n.to_bytes(4, "big")[::-1]
                else:
                    reply, _ = client.call(Ping(id=n, instance_id=n))
                    assert isinstance(reply, Pong) and reply.version == str(n)
        except BaseException as exc:
            errors.append(exc)
        finally:
            client.close()

    threads = [threading.Thread(target=body, args=(t,)) for t in range(16)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert not errors, errors[0]


def test_a_late_reply_is_never_taken_for_the_next_answer(echo: tuple[Echo, str]) -> None:
    _, endpoint = echo
    client = ZmqTransport(endpoint)
    try:
        with pytest.raises(ServerUnavailableError, match="no reply"):
            client.call(Ping(id=1, instance_id=SLOW), timeout=0.1)
        reply, _ = client.call(Ping(id=2, instance_id=7), timeout=5)
        assert reply.id == 2 and isinstance(reply, Pong) and reply.version == "7"
        time.sleep(0.6)  # the late reply has been sent by now (to the replaced socket)
        reply, _ = client.call(Ping(id=3, instance_id=8), timeout=5)
        assert reply.id == 3 and isinstance(reply, Pong) and reply.version == "8"
    finally:
        client.close()


def small_handler() -> RequestHandler:
    """The server's parts over a 1 MiB numpy pool, as `lmcache server` wires them."""
    settings = ServerSettings(chunk_size=CHUNK, lock_ttl_s=30)
    pool = np.zeros(1 << 20, dtype=np.uint8)
    return build(settings, pool, registry=EngineRegistry(CHUNK), metrics=Metrics(dict)).handler


def test_lookups_are_answered_on_the_loop_and_copies_deferred() -> None:
    handler = small_handler()
    tokens = unique_tokens(2 * CHUNK).astype("<u4").tobytes()
    lookup = Lookup(id=1, request_id="r", tokens=tokens, **MODEL)
    assert handler.dispatch(lookup) == LookupReply(id=1, hit_tokens=0)
    assert handler.dispatch(EndSession(id=2, request_id="r")) == Ok(id=2)
    store = Store(id=3, request_id="r", instance_id=1, tokens=tokens, start=0, end=CHUNK,
                  block_ids=list(range(16)))  # fmt: skip
    deferred = handler.dispatch(store)
    assert isinstance(deferred, Deferred)
    outcome = deferred.run()  # run here instead of on the pool: still a typed reply
    assert isinstance(outcome, ErrorReply) and outcome.id == 3 and outcome.code == "unknown_engine"


def test_concurrent_lookups_pin_until_their_session_ends(
    server: ServerProcess, engine: ShmKVCache
) -> None:
    """16 clients look up one cached prompt at once: each gets the full hit and pins the
    chunks for its own session; ending (or re-looking-up) a session releases its pins."""
    setup = server.client()
    register(setup, engine, 31)
    tokens = unique_tokens(2 * CHUNK)
    assert setup.store("s", 31, tokens, start=0, end=2 * CHUNK, block_ids=range(32)).stored_tokens
    errors: list[BaseException] = []

    def body(t: int) -> None:
        client = server.client()
        try:
            for i in range(60):
                rid = f"conc-{t}"
                assert client.lookup(rid, tokens, **MODEL) == 2 * CHUNK
                if i % 3 == 0:
                    client.end_session(rid)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(t,)) for t in range(16)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not errors, errors[0]
    status = httpx.get(f"{server.url}/status").json()
    # The last lookup of every thread (i = 59) is still open: both chunks stay pinned.
    assert status["sessions"]["active"] == 16 and status["l1"]["locked"] == 2
    assert status["l1"]["leases"] == 16
    for t in range(16):
        setup.end_session(f"conc-{t}")
    status = httpx.get(f"{server.url}/status").json()
    assert status["l1"]["locked"] == 0 and status["l1"]["leases"] == 0


def test_stray_replies_are_skipped_within_the_deadline() -> None:
    """Undecodable frames and replies to other requests are dropped; they never extend
    the caller's timeout."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            if not router.poll(50):
                continue
            identity, header = router.recv_multipart()
            rid = msgspec.msgpack.decode(header)["id"]
            if rid == 9:  # the garbage-only request: answer with noise, forever
                while not stop.wait(0.05):
                    router.send_multipart([identity, b"\xc1noise"])
                return
            router.send_multipart([identity, b"\xc1noise"])
            router.send_multipart([identity, encode(Ok(id=rid + 100))])
            router.send_multipart([identity, encode(Ok(id=rid))])

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client = ZmqTransport(f"tcp://127.0.0.1:{port}")
    try:
        reply, _ = client.call(EndSession(id=5, request_id="x"), timeout=5)
        assert reply == Ok(id=5)
        t0 = time.monotonic()
        with pytest.raises(ServerUnavailableError):
            client.call(EndSession(id=9, request_id="x"), timeout=0.3)
        assert time.monotonic() - t0 < 2
    finally:
        stop.set()
        thread.join(timeout=5)
        client.close()
        router.close(linger=0)


@pytest.mark.parametrize("prefer_local", [False, True])
def test_a_server_of_another_protocol_version_is_refused(prefer_local: bool) -> None:
    other = PROTOCOL_VERSION + 1

    def server(req: Request, data: list[bytes]) -> Reply:
        if isinstance(req, Ping):
            return Pong(id=req.id, server_token="t", chunk_size=1, version="9.0", protocol=other)
        return Ok(id=req.id)

    client = LMCacheClient(MockTransport(server), prefer_local=prefer_local)
    expected = (
        f"version 9.0\\) speaks protocol {other}, this client speaks protocol {PROTOCOL_VERSION}"
    )
    with pytest.raises(ProtocolMismatchError, match=expected):
        if prefer_local:
            client.end_session("r")  # any first call pings first, and finds it there
        else:
            client.ping()
    same = LMCacheClient(
        MockTransport(lambda req, _: Pong(id=req.id, server_token="t", chunk_size=1, version="x"))
    )
    assert same.ping().protocol == PROTOCOL_VERSION


def test_the_connector_names_a_protocol_mismatch_instead_of_an_unreachable_server(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from lmcache.integration.vllm.config import ConnectorConfig
    from lmcache.integration.vllm.link import ServerLink

    def server(req: Request, data: list[bytes]) -> Reply:
        assert isinstance(req, Ping)
        return Pong(id=req.id, server_token="t", chunk_size=256, version="9.0", protocol=99)

    monkeypatch.setattr(
        LMCacheClient, "connect", classmethod(lambda cls, *a: cls(MockTransport(server)))
    )
    with pytest.raises(ConnectionError) as info:
        ServerLink(ConnectorConfig())
    assert str(info.value).startswith("Incompatible LMCache server: ")
    assert "speaks protocol 99" in str(info.value) and "Cannot reach" not in str(info.value)


def test_every_request_type_has_a_route_that_says_where_it_runs() -> None:
    handler = small_handler()
    assert set(handler.routes) == set(typing.get_args(Request))
    pooled = {t.__name__ for t, r in handler.routes.items() if r.runs is Runs.POOL}
    assert pooled == {"Store", "Retrieve", "StoreBytes", "RetrieveBytes"}
    assert {t.__name__ for t, r in handler.routes.items() if r.takes_data} == {"StoreBytes"}
