"""Read big Redis bulk replies straight into the caller's buffer.

redis-py with hiredis moves every byte of a GET reply three times before we see it:
socket -> read buffer -> hiredis' reader buffer -> a new ``bytes`` object; then we
copy it once more into L1. For multi-MiB parts that capped reads near 0.45 GB/s on
a machine where redis-server serves 1.8 GB/s. Here the reply header is peeked, and
the payload goes from the socket into its final place with ``recv_into``:

    "$4194304\\r\\n" <payload> "\\r\\n"     -> header via MSG_PEEK, payload via recv_into
    "$-1\\r\\n" (RESP2) or "_\\r\\n" (RESP3)   -> the key does not exist

Only plain TCP / Unix sockets (MSG_PEEK); TLS and Cluster keep the redis-py path.
Any surprise raises `RespError`, and the caller drops the connection: a half-read
reply must never be parsed as the next command's answer.
"""

from __future__ import annotations

import socket
import time

import numpy as np

_MAX_HEADER = 64  # "$" + up to 20 digits + CRLF, with room to spare
_SCRATCH = 1 << 20


class RespError(OSError):
    """The reply was not what a GET of an existing string returns."""


def _header(sock: socket.socket) -> bytes:
    """The next line (without CRLF), consuming exactly it."""
    # Redis writes a reply's header and payload together, so the whole line is almost
    # always there at the first peek; if not, peek again until the socket's timeout.
    timeout = sock.gettimeout()
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        peeked = sock.recv(_MAX_HEADER, socket.MSG_PEEK)
        if not peeked:
            raise RespError("connection closed by Redis")
        end = peeked.find(b"\r\n")
        if end >= 0:
            break
        if len(peeked) >= _MAX_HEADER:
            raise RespError(f"reply line too long: {peeked[:32]!r}")
        if deadline is not None and time.monotonic() > deadline:
            raise RespError("timed out waiting for the rest of a reply line")
        time.sleep(0.0001)
    _exactly(sock, memoryview(bytearray(end + 2)))
    return peeked[:end]


def _exactly(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise RespError("connection closed by Redis in the middle of a reply")
        got += n


def read_bulk_into(sock: socket.socket, out: memoryview) -> bool:
    """Read one bulk-string reply into ``out``.

    True if it was a string of exactly ``len(out)`` bytes (now in ``out``); False for
    a missing key or a string of another length (read and thrown away, so the
    connection stays in step). An error reply or a protocol surprise raises.
    """
    line = _header(sock)
    if line == b"_":
        return False  # RESP3 null: the key does not exist
    if line.startswith(b"-"):
        raise RespError(f"Redis error: {line[1:200].decode(errors='replace')}")
    if not line.startswith(b"$") or not line[1:].lstrip(b"-").isdigit():
        raise RespError(f"expected a bulk string reply, got {line[:32]!r}")
    size = int(line[1:])
    if size < 0:
        return False  # nil: the key does not exist
    if size != len(out):
        _discard(sock, size + 2)
        return False
    _exactly(sock, out)
    crlf = memoryview(bytearray(2))
    _exactly(sock, crlf)
    if crlf.tobytes() != b"\r\n":
        raise RespError("bulk string not terminated by CRLF")
    return True


def _discard(sock: socket.socket, n: int) -> None:
    scratch = memoryview(np.empty(min(n, _SCRATCH), dtype=np.uint8).data)
    while n > 0:
        k = sock.recv_into(scratch[: min(n, len(scratch))])
        if k == 0:
            raise RespError("connection closed by Redis in the middle of a reply")
        n -= k
