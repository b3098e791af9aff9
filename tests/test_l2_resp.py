"""The direct read path of RedisL2: the bulk-reply reader (real sockets, hand-written
replies) and the one seam into redis-py's internals (the installed redis-py, a real
redis-server)."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import redis

from lmcache.processes import RedisProcess
from lmcache.storage.l2 import redis_conn
from lmcache.storage.l2.redis import RedisL2
from lmcache.storage.l2.redis_conn import PackingConnection, raw_socket
from lmcache.storage.l2.resp import RespError, read_bulk_into
from lmcache.types import ObjectKey

from .conftest import start_redis


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


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisProcess]:
    server = start_redis()
    yield server
    server.stop()


def test_the_socket_seam_works_with_the_installed_redis_py(redis_server: RedisProcess) -> None:
    """If this fails, redis-py keeps its socket elsewhere now: RedisL2 still reads through
    redis-py (and warns once), but the direct path of `redis_conn` needs updating."""
    client = redis.Redis.from_url(redis_server.url, connection_class=PackingConnection)
    client.set("seam", b"abc")
    pool = client.connection_pool
    conn = pool.get_connection()
    try:
        sock = raw_socket(conn)
        assert sock is not None, (
            f"redis-py {redis.__version__}: no connected socket in "
            f"{type(conn).__name__}.{redis_conn.SOCK_ATTR}"
        )
        conn.send_command("GET", "seam")
        out = bytearray(3)
        assert read_bulk_into(sock, memoryview(out)) and out == b"abc"  # its very socket
    finally:
        pool.release(conn)
        client.close()


def _objects() -> list[tuple[ObjectKey, bytes]]:
    return [(ObjectKey(bytes([i]) * 48), os.urandom(3 * 1024 * 1024 + i)) for i in range(3)]


def _put_and_read(adapter: RedisL2) -> None:
    try:
        for key, data in _objects():
            adapter.put(key, data)
            out = bytearray(len(data))
            assert adapter.get_into(key, memoryview(out)) and out == data
        assert adapter.stats()["corrupted"] == 0
    finally:
        adapter.clear()
        adapter.close()


def test_reads_use_the_direct_path(
    redis_server: RedisProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[bool | None] = []
    direct = redis_conn.read_parts_into

    def spy(*args: Any) -> bool | None:
        calls.append(direct(*args))
        return calls[-1]

    monkeypatch.setattr("lmcache.storage.l2.redis.read_parts_into", spy)
    _put_and_read(RedisL2(redis_server.url, part_mb=1))
    assert calls == [True, True, True]


def test_a_moved_socket_means_redis_py_reads_and_one_warning(
    redis_server: RedisProcess, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(redis_conn, "SOCK_ATTR", "_renamed_in_a_future_redis_py")
    monkeypatch.setattr(redis_conn, "_fallback_logged", False)
    with caplog.at_level(logging.WARNING, logger="lmcache.storage.l2.redis_conn"):
        _put_and_read(RedisL2(redis_server.url, part_mb=1))
    warnings = [r.getMessage() for r in caplog.records if "not a connected socket" in r.message]
    assert len(warnings) == 1 and redis.__version__ in warnings[0], caplog.text
