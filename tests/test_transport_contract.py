"""One contract for every client `Transport`: ZMQ over TCP, ZMQ over the local endpoint,
and `MockTransport`. Each fixture serves the same small handler:

    Ping              -> Pong (version = the instance id)
    RetrieveBytes     -> the request's data frames reversed, each frame reversed
    anything else     -> silence (the server never answers)
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lmcache.errors import ServerUnavailableError
from lmcache.processes import free_port
from lmcache.protocol.messages import (
    ChunkData,
    EndSession,
    Ok,
    Ping,
    Pong,
    Reply,
    Request,
    RetrieveBytes,
)
from lmcache.transport.base import MockTransport, Transport
from lmcache.transport.peers import Peer
from lmcache.transport.zmq_client import ZmqTransport
from lmcache.transport.zmq_server import Deferred, Frames, Outcome, ZmqServer

TIMEOUT = 0.3


def handle(req: Request, data: list[bytes]) -> Reply | tuple[Reply, list[bytes]] | None:
    if isinstance(req, Ping):
        return Pong(id=req.id, server_token="t", chunk_size=1, version=str(req.instance_id))
    if isinstance(req, RetrieveBytes):
        frames = [d[::-1] for d in reversed(data)]
        return ChunkData(id=req.id, chunks=len(frames), chunk_bytes=0), frames
    return None


def zmq_dispatch(req: Request, data: Frames, peer: Peer) -> Outcome | Deferred:
    outcome = handle(req, [bytes(d) for d in data])
    if outcome is not None:
        return outcome

    def silent() -> Outcome:
        time.sleep(3 * TIMEOUT)  # answers only after the caller gave up
        return Ok(id=req.id)

    return Deferred(silent)


@pytest.fixture(params=["zmq-tcp", "zmq-local", "mock"])
def transport(request: pytest.FixtureRequest) -> Iterator[Transport]:
    if request.param == "mock":
        yield MockTransport(handle)
        return
    with tempfile.TemporaryDirectory() as tmp:
        local = str(Path(tmp) / "server.sock")
        endpoint = f"tcp://127.0.0.1:{free_port()}"
        server = ZmqServer(endpoint, zmq_dispatch, max_workers=2, local_path=local)
        server.start()
        client = ZmqTransport(endpoint if request.param == "zmq-tcp" else f"ipc://{local}")
        try:
            yield client
        finally:
            client.close()
            server.stop()


def ping(n: int) -> Ping:
    return Ping(id=n, instance_id=n)


def test_a_reply_answers_its_own_request(transport: Transport) -> None:
    for n in (1, 2, 3):
        reply, frames = transport.call(ping(n), timeout=5)
        assert isinstance(reply, Pong) and reply.id == n and reply.version == str(n)
        assert list(frames) == []


def test_data_frames_pass_both_ways_byte_for_byte(transport: Transport) -> None:
    data = [bytes(range(256)) * 64, b"", b"\x00\xff" * 3]
    req = RetrieveBytes(id=7, request_id="r", instance_id=1, tokens=b"", start=0, end=0)
    reply, frames = transport.call(req, timeout=5, data=data)
    assert isinstance(reply, ChunkData) and reply.id == 7
    assert [bytes(f) for f in frames] == [d[::-1] for d in reversed(data)]


def test_a_silent_server_is_unavailable_and_the_next_call_gets_its_own_reply(
    transport: Transport,
) -> None:
    start = time.monotonic()
    with pytest.raises(ServerUnavailableError):
        transport.call(EndSession(id=10, request_id="r"), timeout=TIMEOUT)
    assert time.monotonic() - start < 10 * TIMEOUT
    time.sleep(3 * TIMEOUT)  # the late answer to the silent request arrives (if at all)
    reply, _ = transport.call(ping(11), timeout=5)
    assert reply.id == 11


def test_calls_from_many_threads_each_get_their_reply(transport: Transport) -> None:
    errors: list[str] = []

    def worker(base: int) -> None:
        for n in range(base, base + 50):
            reply, _ = transport.call(ping(n), timeout=5)
            if reply.id != n:
                errors.append(f"{n} got {reply.id}")

    threads = [threading.Thread(target=worker, args=(1000 * (i + 1),)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_a_closed_transport_refuses_calls(transport: Transport) -> None:
    transport.close()
    with pytest.raises(ServerUnavailableError, match="closed"):
        transport.call(ping(1), timeout=1)
