"""The ZMQ ROUTER loop.

ZMQ sockets are not thread-safe, so only the loop thread touches the ROUTER.
Worker threads hand their encoded replies back through per-thread inproc PUSH
sockets that the loop polls beside the ROUTER::

    engines ──DEALER──> ROUTER ─┐ loop thread: decode, dispatch
                                ├─ cheap request: reply at once
                                └─ data movement: worker pool ──PUSH──> PULL ─┐
    engines <─────────── ROUTER <──────────────────────────────────────────────┘
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import zmq

from lmcache.protocol.codec import decode_request, encode, error_reply
from lmcache.protocol.messages import ErrorCode, ErrorReply, Reply, Request

logger = logging.getLogger(__name__)

Frames = list[memoryview]
Outcome = Reply | tuple[Reply, list[bytes]]  # a reply, optionally with data frames
Dispatch = Callable[[Request, Frames], "Reply | Callable[[], Outcome]"]
MAX_FRAME_BYTES = 256 << 20


class ZmqServer:
    def __init__(self, endpoint: str, dispatch: Dispatch, max_workers: int) -> None:
        self.endpoint = endpoint
        self._dispatch = dispatch
        self._ctx = zmq.Context()
        self._router = self._ctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
        self._router.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self._replies = self._ctx.socket(zmq.PULL)
        self._reply_addr = f"inproc://lmcache-replies-{id(self)}"
        self._replies.bind(self._reply_addr)
        self._local = threading.local()
        self._pushers: list[zmq.Socket[bytes]] = []
        self._pushers_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers, thread_name_prefix="lmcache-worker")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lmcache-zmq-loop", daemon=True)
        self.max_workers = max_workers
        self.in_flight = 0
        self.error: str | None = None

    def start(self) -> None:
        try:
            self._router.bind(self.endpoint)
        except zmq.ZMQError as exc:
            self._close_sockets()
            raise OSError(f"cannot bind ZMQ endpoint {self.endpoint}: {exc}") from exc
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
        self._router.close(linger=0)
        self._replies.close(linger=0)
        self._ctx.term()

    # ----- loop thread ---------------------------------------------------------------

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._replies, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                events = dict(poller.poll(100))
                if self._replies in events:
                    self._drain_replies()
                if self._router in events:
                    self._drain_requests()
        except Exception as exc:  # the loop must never die silently: health reports it
            self.error = f"{type(exc).__name__}: {exc}"
            logger.exception("ZMQ loop crashed")

    def _drain_replies(self) -> None:
        while True:
            try:
                frames = self._replies.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self.in_flight -= 1
            self._send([f.buffer for f in frames])

    def _drain_requests(self) -> None:
        for _ in range(256):  # bounded so replies are not starved
            try:
                frames = self._router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                self._handle(frames)
            except Exception as exc:  # one bad message must not take the loop down
                logger.exception("failed to handle a request")
                reply = error_reply(-1, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
                self._send([frames[0].bytes, encode(reply)])

    def _handle(self, frames: list[zmq.Frame]) -> None:
        identity = frames[0].bytes
        if len(frames) < 2:
            reply: Reply = error_reply(-1, ErrorCode.BAD_REQUEST, "empty message")
            self._send([identity, encode(reply)])
            return
        req = decode_request(frames[1].bytes)
        if isinstance(req, ErrorReply):
            logger.warning("rejected request %d: %s", req.id, req.message)
            self._send([identity, encode(req)])
            return
        result = self._dispatch(req, [memoryview(f.buffer) for f in frames[2:]])
        if callable(result):
            self.in_flight += 1
            self._pool.submit(self._run_deferred, identity, result)
        else:
            self._send([identity, encode(result)])

    def _send(self, frames: list[Any]) -> None:
        try:
            self._router.send_multipart(frames, zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as exc:  # peer gone or its queue full: nothing to do
            logger.debug("could not send reply: %s", exc)

    # ----- worker threads -------------------------------------------------------------

    def _run_deferred(self, identity: bytes, work: Callable[[], Outcome]) -> None:
        outcome = work()  # handlers turn every failure into an ErrorReply
        reply, data = outcome if isinstance(outcome, tuple) else (outcome, [])
        sock = getattr(self._local, "push", None)
        if sock is None:
            sock = self._ctx.socket(zmq.PUSH)
            sock.connect(self._reply_addr)
            self._local.push = sock
            with self._pushers_lock:
                self._pushers.append(sock)
        sock.send_multipart([identity, encode(reply), *data], copy=False)
