"""redis-py connections as `RedisL2` uses them: how commands go out, how big replies come in.

    put:  PackingConnection: the pure-Python packer sends a memoryview as it is
    get:  GET part 0..n-1 pipelined on one connection; raw_socket(conn) ──read_bulk_into──> out
          buffered (TLS, Cluster, or redis-py's socket out of reach): redis-py reads the
          replies, then fill_from_parts copies them into out

redis-py has no public way to read a reply into the caller's buffer, so the direct
path needs the connection's socket, which redis-py keeps in the private
``Connection._sock``. `raw_socket` is the only code that touches it: should a redis-py
release rename or wrap it, reads take the buffered path (the same bytes, slower) and
the log says so once, and ``tests/test_l2_resp.py`` fails against that redis-py
before it reaches a server.
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import Any

import redis
from redis.connection import Connection, PythonRespSerializer, SSLConnection

from lmcache.storage.l2.format import Header, copy_hashing, hasher
from lmcache.storage.l2.resp import read_bulk_into

logger = logging.getLogger(__name__)

SOCK_ATTR = "_sock"  # redis-py 5.x to 8.x: the connected socket, None when disconnected
_fallback_logged = False
_fallback_lock = threading.Lock()


def _encode(value: object) -> bytes | bytearray | memoryview:
    if isinstance(value, bytes | bytearray | memoryview):
        return value
    return (value if isinstance(value, str) else repr(value)).encode()


# With hiredis installed, redis-py packs commands with hiredis, which copies every value
# twice (bytes(memoryview), then the packed command): puts of big parts ran 4x slower.
# The pure-Python packer sends a memoryview as it is; hiredis still parses the replies.
_PACKER = PythonRespSerializer(6000, _encode)


class PackingConnection(Connection):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(command_packer=_PACKER, **kwargs)  # type: ignore[no-untyped-call]


class PackingSSLConnection(SSLConnection):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(command_packer=_PACKER, **kwargs)


def raw_socket(conn: Connection) -> socket.socket | None:
    """The connected socket under ``conn``; None (and one WARNING per process) when
    redis-py no longer keeps it where we look. The one access to redis-py internals."""
    sock = getattr(conn, SOCK_ATTR, None)
    if isinstance(sock, socket.socket) and sock.fileno() >= 0:
        return sock
    global _fallback_logged  # once per process, whichever adapter meets it first
    with _fallback_lock:
        first, _fallback_logged = not _fallback_logged, True
    if first:
        logger.warning(
            "redis-py %s: %s.%s is %s, not a connected socket; Redis reads go through "
            "redis-py's parser instead (the same bytes, slower)",
            redis.__version__, type(conn).__name__, SOCK_ATTR, type(sock).__name__,
        )  # fmt: skip
    return None


def read_parts_into(client: redis.Redis, base: str, header: Header, out: memoryview) -> bool | None:
    """GET every part (``<base>0``, ``<base>1``, ...) straight into ``out`` (see `resp`);
    True if all match the header. None: the socket is out of reach (`raw_socket`) and
    nothing was sent, so the caller takes the buffered path."""
    part = header.part_size
    if header.payload_len != len(out) or part <= 0:
        return False
    pool = client.connection_pool
    conn = pool.get_connection()  # connected: the pool connects what it hands out
    in_step = False
    try:
        sock = raw_socket(conn)
        if sock is None:
            in_step = True
            return None
        names = [f"{base}{i}" for i in range(header.parts)]
        packed = conn.pack_commands([("GET", n) for n in names])
        conn.send_packed_command(packed)
        h, good = hasher(), True
        for i in range(header.parts):
            view = out[i * part : (i + 1) * part]
            if read_bulk_into(sock, view):
                h.update(view)
            else:
                good = False  # keep reading: every reply must leave the socket
        in_step = True
        return good and h.intdigest() == header.checksum
    finally:
        if not in_step:
            conn.disconnect()  # a half-read reply must not be read as the next one
        pool.release(conn)


def fill_from_parts(out: memoryview, header: Header, parts: list[bytes | None]) -> bool:
    """Copy parts that redis-py read into ``out`` if they are exactly the object ``header``
    describes (the buffered path)."""
    if header.payload_len != len(out) or len(parts) != header.parts:
        return False
    offset, h = 0, hasher()
    for blob in parts:
        if blob is None or not 0 < len(blob) <= header.part_size:
            return False
        end = offset + len(blob)
        if end > len(out) or (end < len(out) and len(blob) != header.part_size):
            return False
        copy_hashing(out[offset:end], blob, h)
        offset = end
    return offset == len(out) and h.intdigest() == header.checksum
