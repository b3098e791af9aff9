"""The fuzz harness's raw client (a bare DEALER socket, no `LMCacheClient` in between: the
fuzzers must be able to send what no client would) and the constants every part of the
harness shares: the real engine the fixtures register, the protocol's int bounds, and the
sizes of the server's L1 pool and of the real engine's chunks."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import zmq

from lmcache.protocol.codec import decode_reply
from lmcache.protocol.messages import ChunkData, ErrorCode, Reply
from lmcache.transport.peers import local_socket_path

from ..conftest import BLOCK, CHUNK

ENGINE_ID = 4242  # the one real engine; the fuzzers never register or unregister it
LOCK_TTL_S = 600  # leases must be gone because they were released, not because they expired
REPLY_TIMEOUT_S = 5.0
INT64_MIN, INT64_MAX, UINT64_MAX = -(2**63), 2**63 - 1, 2**64 - 1  # what msgpack can carry
TOKENS_MAX, SIZE_MAX, COUNT_MAX = 2**40, 2**48, 2**31  # the protocol's bounds (messages.py)
L1_BYTES = 1 << 28  # --l1-size-gb 0.25, as start_server passes
BPC = CHUNK // BLOCK  # blocks per chunk of the real engine
REAL_CHUNK_BYTES = 4 * BPC * 2048  # its chunk: 4 layers, 2048 bytes a block
MAX_FUZZ_FRAME = 1 << 20  # data frames the fuzzers send stay this small (runtime)

BAD, UNKNOWN_ENGINE, MISS = ErrorCode.BAD_REQUEST, ErrorCode.UNKNOWN_ENGINE, ErrorCode.MISS
TRANSFER_FAILED = ErrorCode.TRANSFER_FAILED
FORBIDDEN = ErrorCode.FORBIDDEN

# Failing examples hold long strings and token arrays; let hypothesis print them anyway.
# (A module's ``pytestmark``.)
LARGE_REPRS_OK = pytest.mark.filterwarnings(
    "ignore:Generating overly large repr:hypothesis.errors.HypothesisWarning"
)


class Blob(bytes):
    """A data frame that prints as its size (chunks are 128 KiB)."""

    def __repr__(self) -> str:
        return f"<{len(self)} bytes>"


@dataclasses.dataclass(frozen=True)
class Call:
    """A request and the data frames sent after it, kept as (size, seed) until sent."""

    req: Any
    frames: tuple[tuple[int, int], ...] = ()

    def data(self) -> list[bytes]:
        return [np.random.default_rng(seed).bytes(size) for size, seed in self.frames]

    def __repr__(self) -> str:
        return f"Call({self.req!r}, frames={[size for size, _ in self.frames]})"


class Wire:
    """A bare DEALER socket: frames out, exactly one decoded reply back per request."""

    def __init__(self, port: int) -> None:
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        # The local endpoint: the fuzzer is a trusted peer (server's uid), who may do most.
        self._endpoint = f"ipc://{local_socket_path(port)}"
        self.sock = self._connect()

    def _connect(self) -> zmq.Socket[bytes]:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self._endpoint)
        return sock

    @contextlib.contextmanager
    def fresh_on_failure(self) -> Iterator[None]:
        """On a failure, start over on a new socket: replies still on their way to the old
        one must not be taken for answers to the next example's requests."""
        try:
            yield
        except BaseException:
            self.sock.close(linger=0)
            self.sock = self._connect()
            raise

    def send(self, *frames: bytes) -> None:
        self.sock.send_multipart(list(frames))

    def recv(self, timeout: float = REPLY_TIMEOUT_S) -> tuple[Reply, list[bytes]]:
        """One reply and its data frames (only a `ChunkData` has any: ``chunks`` of them)."""
        if not self.sock.poll(int(timeout * 1000), zmq.POLLIN):
            raise AssertionError(f"no reply within {timeout:g}s")
        parts = self.sock.recv_multipart()
        reply = decode_reply(parts[0])
        expected = 1 + reply.chunks if isinstance(reply, ChunkData) else 1
        assert len(parts) == expected, f"{reply!r} came in {len(parts)} frames"
        return reply, parts[1:]

    def call(self, *frames: bytes, timeout: float = REPLY_TIMEOUT_S) -> Reply:
        self.send(*frames)
        return self.recv(timeout)[0]

    def assert_quiet(self, timeout_ms: int = 0) -> None:
        assert not self.sock.poll(timeout_ms, zmq.POLLIN), "the server sent an unasked-for reply"

    def close(self) -> None:
        self.sock.close(linger=0)
        self._ctx.term()
