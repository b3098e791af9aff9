"""The direct bulk-reply reader used by RedisL2 reads: real sockets, hand-written replies."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest

from lmcache.storage.l2.resp import RespError, read_bulk_into


def _pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.settimeout(2.0)
    return a, b


def test_reads_a_bulk_string_into_the_buffer_and_keeps_the_stream_in_step() -> None:
    reader, writer = _pair()
    payload = np.random.default_rng(1).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
    out = bytearray(len(payload))

    def send() -> None:
        writer.sendall(
            b"$%d\r\n" % len(payload) + payload + b"\r\n$-1\r\n_\r\n$3\r\nabc\r\n$2\r\nhi\r\n"
        )

    t = threading.Thread(target=send)
    t.start()
    assert read_bulk_into(reader, memoryview(out))
    assert bytes(out) == payload
    assert not read_bulk_into(reader, memoryview(bytearray(5)))  # nil: missing key
    assert not read_bulk_into(reader, memoryview(bytearray(5)))  # RESP3 null
    assert not read_bulk_into(reader, memoryview(bytearray(5)))  # wrong length: drained
    two = bytearray(2)
    assert read_bulk_into(reader, memoryview(two)) and two == b"hi"  # still in step
    t.join()


def test_a_header_split_across_packets_is_waited_for() -> None:
    reader, writer = _pair()

    def send() -> None:
        writer.sendall(b"$1")
        time.sleep(0.05)
        writer.sendall(b"0\r\n0123456789\r\n")

    t = threading.Thread(target=send)
    t.start()
    out = bytearray(10)
    assert read_bulk_into(reader, memoryview(out)) and out == b"0123456789"
    t.join()


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (b"-ERR wrong kind\r\n", "Redis error: ERR wrong kind"),
        (b"+OK\r\n", "expected a bulk string"),
        (b"$abc\r\n", "expected a bulk string"),
        (b"$" + b"9" * 80, "too long"),
        (b"$3\r\nabcXY", "not terminated by CRLF"),
    ],
)
def test_surprises_raise(reply: bytes, message: str) -> None:
    reader, writer = _pair()
    writer.sendall(reply)
    with pytest.raises(RespError, match=message):
        read_bulk_into(reader, memoryview(bytearray(3)))


def test_a_peer_that_closes_mid_reply_raises() -> None:
    reader, writer = _pair()
    writer.sendall(b"$10\r\n01234")
    writer.close()
    with pytest.raises(RespError, match="closed"):
        read_bulk_into(reader, memoryview(bytearray(10)))


def test_a_stalled_header_times_out() -> None:
    reader, writer = _pair()
    reader.settimeout(0.2)
    writer.sendall(b"$12")
    with pytest.raises(RespError, match="timed out"):
        read_bulk_into(reader, memoryview(bytearray(12)))
