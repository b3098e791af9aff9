"""The ZMQ ROUTER loop.

ZMQ sockets are not thread-safe, so only the loop thread touches the ROUTER.
Worker threads hand their encoded replies back through per-thread inproc PUSH
sockets that the loop polls beside the ROUTER::

    engines ──DEALER──> ROUTER ─┐ loop thread: decode, dispatch
                                ├─ cheap request: reply at once
                                └─ data movement: worker pool ──PUSH──> PULL ─┐
    engines <─────────── ROUTER <──────────────────────────────────────────────┘

Two ROUTERs share the loop: TCP (``--host``/``--port``, where nothing proves who a
peer is unless CurveZMQ is on) and a Unix socket beside the shared-memory segments,
where the kernel tells the server each peer's uid (see `lmcache.transport.peers`).
Every request reaches the dispatcher with the `Peer` its connection authenticated as.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import zmq

from lmcache.protocol.codec import decode_request, encode, error_reply
from lmcache.protocol.messages import ErrorCode, ErrorReply, Reply, Request
from lmcache.transport.peers import (
    LOCAL_DOMAIN,
    TCP_DOMAIN,
    CurveServerKeys,
    Peer,
    ZapHandler,
    peer_from_user_id,
)

logger = logging.getLogger(__name__)

Frames = list[memoryview]
Outcome = Reply | tuple[Reply, list[bytes]]  # a reply, optionally with data frames


@dataclass(frozen=True, slots=True)
class Deferred:
    """A dispatcher's answer "run this on the worker pool": the reply goes out when done."""

    run: Callable[[], Outcome]


Dispatch = Callable[[Request, Frames, Peer], "Outcome | Deferred"]
MAX_FRAME_BYTES = 256 << 20  # larger frames get a bad_request reply
# libzmq drops a connection whose frame exceeds this, without a reply: beyond the
# limit above, so that a frame a little too large is answered, not silently dropped.
HARD_FRAME_BYTES = 2 * MAX_FRAME_BYTES
_MAX_PEERS = 4096  # memo of user id -> Peer


# Plain ints: pyzmq's flags are enum.Flag members, and `|` / `&` on those run Python code.
_NOBLOCK = int(zmq.NOBLOCK)
_MORE = int(zmq.NOBLOCK | zmq.SNDMORE)
_POLLIN = int(zmq.POLLIN)


def _readable(sock: zmq.Socket[bytes]) -> bool:
    """A message is waiting: about 1 us, where a recv that raises `zmq.Again` costs ~5."""
    events = sock.getsockopt(zmq.EVENTS)
    return isinstance(events, int) and bool(events & _POLLIN)  # (isinstance: cheaper than cast)


class ZmqServer:
    def __init__(
        self,
        endpoint: str,
        dispatch: Dispatch,
        max_workers: int,
        *,
        local_path: str | None = None,
        curve: CurveServerKeys | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.local_path = local_path
        self.local_endpoint = f"ipc://{local_path}" if local_path else ""
        self._dispatch = dispatch
        self._ctx = zmq.Context()
        self._zap = ZapHandler(self._ctx, curve)  # before any bind: every connection asks it
        self._router = self._router_socket(TCP_DOMAIN)
        if curve is not None:
            self._router.setsockopt(zmq.CURVE_SERVER, 1)
            self._router.setsockopt(zmq.CURVE_SECRETKEY, curve.secret)
        self._local = self._router_socket(LOCAL_DOMAIN) if local_path else None
        self._routers = [self._router] + ([self._local] if self._local is not None else [])
        self._replies = self._ctx.socket(zmq.PULL)
        self._reply_addr = f"inproc://lmcache-replies-{id(self)}"
        self._replies.bind(self._reply_addr)
        self._thread_local = threading.local()
        self._pushers: list[zmq.Socket[bytes]] = []
        self._pushers_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers, thread_name_prefix="lmcache-worker")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lmcache-zmq-loop", daemon=True)
        self._peers: dict[bytes, Peer] = {}
        self._bound_local = False
        self._uid = os.getuid()
        self.max_workers = max_workers
        self.in_flight = 0
        self.error: str | None = None

    def _router_socket(self, domain: bytes) -> zmq.Socket[bytes]:
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, HARD_FRAME_BYTES)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        sock.setsockopt(zmq.ZAP_DOMAIN, domain)
        return sock

    def start(self) -> None:
        try:
            self._router.bind(self.endpoint)
        except zmq.ZMQError as exc:
            self._close_sockets()
            raise OSError(exc.errno, f"cannot bind ZMQ endpoint {self.endpoint}: {exc}") from exc
        if self._local is not None and self.local_path:
            try:
                _bind_private_socket(self._local, self.local_path)
            except OSError:
                self._close_sockets()
                raise
            self._bound_local = True
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        """Stop accepting requests, let running copies finish, close the sockets."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._close_sockets()

    def _close_sockets(self) -> None:
        with self._pushers_lock:
            for sock in self._pushers:
                sock.close(linger=0)
            self._pushers.clear()
        for router in self._routers:
            router.close(linger=0)
        self._replies.close(linger=0)
        self._zap.close()
        self._ctx.term()
        if self._bound_local and self.local_path:
            _unlink_own_socket(self.local_path)

    # ----- loop thread ---------------------------------------------------------------
    #
    # The loop thread is the server's throughput limit for cheap requests, so it avoids
    # per-message Python overhead: after a poll it receives from the sockets the poll
    # named, and asks whether another message is waiting (EVENTS) rather than catching
    # `zmq.Again`, which costs several times more; the identity arrives as bytes and the
    # other frames as `zmq.Frame`s (`Frame.more` is cheaper than getsockopt(RCVMORE);
    # data frames, which may be large, stay zero-copy); small frames are sent by copy
    # (pyzmq copies frames under its copy threshold anyway, after building a Frame).

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._replies, zmq.POLLIN)
        for router in self._routers:
            poller.register(router, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                for sock, _ in poller.poll(100):  # replies first: their work is done
                    if sock is self._replies:
                        self._drain_replies()
                    else:
                        self._drain_requests(sock)
        except Exception as exc:  # the loop must never die silently: health reports it
            self.error = f"{type(exc).__name__}: {exc}"
            logger.exception("ZMQ loop crashed")

    def _drain_replies(self) -> None:
        replies = self._replies
        while True:
            try:  # the poll said a message is here; `Again` only if it was wrong
                frames = [replies.recv(_NOBLOCK, copy=False)]
            except zmq.Again:
                return
            while frames[-1].more:
                frames.append(replies.recv(_NOBLOCK, copy=False))
            self.in_flight -= 1
            router = self._routers[frames[0].bytes[0]]  # which socket the request came on
            self._send(router, frames[1:])
            if not _readable(replies):
                return

    def _drain_requests(self, router: zmq.Socket[bytes]) -> None:
        for _ in range(256):  # bounded so replies are not starved
            # A multipart message arrives whole: once its first frame is here, all are, and
            # a ROUTER always puts at least one frame after the identity.
            try:  # the poll said a message is here; `Again` only if it was wrong
                identity = router.recv(_NOBLOCK)
            except zmq.Again:
                return
            frame = router.recv(_NOBLOCK, copy=False)
            peer = self._peer(frame)
            header = frame.bytes
            data: list[zmq.Frame] = []
            while frame.more:
                frame = router.recv(_NOBLOCK, copy=False)
                data.append(frame)
            try:
                self._handle(router, identity, header, data, peer)
            except Exception as exc:  # one bad message must not take the loop down
                logger.exception("failed to handle a request")
                reply = error_reply(-1, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
                self._send(router, [identity, encode(reply)])
            if not _readable(router):
                return

    def _peer(self, frame: zmq.Frame) -> Peer:
        """The peer this message's connection authenticated as (see `peers`)."""
        user_id = frame.get("User-Id")
        key = user_id.encode() if isinstance(user_id, str) else b""
        peer = self._peers.get(key)
        if peer is None:
            if len(self._peers) >= _MAX_PEERS:
                self._peers.clear()
            peer = self._peers[key] = peer_from_user_id(key.decode(errors="replace"), self._uid)
        return peer

    def _handle(
        self,
        router: zmq.Socket[bytes],
        identity: bytes,
        header: bytes,
        data: list[zmq.Frame],
        peer: Peer,
    ) -> None:
        too_big = max([len(header), *(len(f) for f in data)])
        if too_big > MAX_FRAME_BYTES:
            req: Request | ErrorReply = error_reply(
                -1, ErrorCode.BAD_REQUEST,
                f"a frame of {too_big} bytes exceeds the limit of {MAX_FRAME_BYTES} bytes",
            )  # fmt: skip
        else:
            req = decode_request(header)
        if isinstance(req, ErrorReply):
            logger.warning("rejected request %d from %s: %s", req.id, peer.label, req.message)
            self._send(router, [identity, encode(req)])
            return
        result = self._dispatch(req, [memoryview(f.buffer) for f in data], peer)
        if isinstance(result, Deferred):
            self.in_flight += 1
            tag = bytes([self._routers.index(router)])
            self._pool.submit(self._run_deferred, tag, identity, result.run)
        else:
            reply, frames = result if isinstance(result, tuple) else (result, [])
            self._send(router, [identity, encode(reply), *frames])

    def _send(self, router: zmq.Socket[bytes], frames: list[Any]) -> None:
        last = len(frames) - 1
        try:
            for i, frame in enumerate(frames):
                flags = _NOBLOCK if i == last else _MORE
                router.send(frame, flags, copy=not isinstance(frame, zmq.Frame))
        except zmq.ZMQError as exc:  # peer gone or its queue full: nothing to do
            logger.debug("could not send reply: %s", exc)

    # ----- worker threads -------------------------------------------------------------

    def _run_deferred(self, tag: bytes, identity: bytes, work: Callable[[], Outcome]) -> None:
        outcome = work()  # handlers turn every failure into an ErrorReply
        reply, data = outcome if isinstance(outcome, tuple) else (outcome, [])
        sock = getattr(self._thread_local, "push", None)
        if sock is None:
            sock = self._ctx.socket(zmq.PUSH)
            sock.connect(self._reply_addr)
            self._thread_local.push = sock
            with self._pushers_lock:
                self._pushers.append(sock)
        sock.send_multipart([tag, identity, encode(reply), *data], copy=False)


def _bind_private_socket(router: zmq.Socket[bytes], path: str) -> None:
    """Bind ``ipc://path`` so that only this uid can connect (mode 0600).

    A socket file left by a crashed server is replaced; one that a live process still
    accepts on, or that belongs to another user, is an error (never steal an endpoint).
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.getuid():
            raise OSError(
                f"{path} exists and is not a socket of this user: remove it or use --port"
            )
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
            raise OSError(f"another server is listening on {path} (same --port?)")
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)  # stale: its server is gone
        finally:
            probe.close()
    # The umask makes the file 0600 from its creation: no window in which another
    # uid could connect (connect needs write permission on the socket file).
    old = os.umask(0o177)
    try:
        router.bind(f"ipc://{path}")
    except zmq.ZMQError as exc:
        raise OSError(f"cannot bind the local endpoint ipc://{path}: {exc}") from exc
    finally:
        os.umask(old)
    os.chmod(path, 0o600)


def _unlink_own_socket(path: str) -> None:
    with contextlib.suppress(OSError):
        if os.lstat(path).st_uid == os.getuid():
            os.unlink(path)
