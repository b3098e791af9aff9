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


# Plain ints: pyzmq's flags are enum.Flag members, and `|` / `&` on those run Python code.
_NOBLOCK = int(zmq.NOBLOCK)
_MORE = int(zmq.NOBLOCK | zmq.SNDMORE)
_POLLIN = int(zmq.POLLIN)


def _readable(sock: zmq.Socket[bytes]) -> bool:
    """A message is waiting: about 1 us, where a recv that raises `zmq.Again` costs ~5."""
    events = sock.getsockopt(zmq.EVENTS)
    return isinstance(events, int) and bool(events & _POLLIN)  # (isinstance: cheaper than cast)


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
        poller.register(self._router, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                for sock, _ in poller.poll(100):  # replies first: their work is done
                    if sock is self._replies:
                        self._drain_replies()
                    else:
                        self._drain_requests()
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
            self._send(frames)
            if not _readable(replies):
                return

    def _drain_requests(self) -> None:
        router = self._router
        for _ in range(256):  # bounded so replies are not starved
            # A multipart message arrives whole: once its first frame is here, all are, and
            # a ROUTER always puts at least one frame after the identity.
            try:  # the poll said a message is here; `Again` only if it was wrong
                identity = router.recv(_NOBLOCK)
            except zmq.Again:
                return
            frame = router.recv(_NOBLOCK, copy=False)
            header = frame.bytes
            data: list[zmq.Frame] = []
            while frame.more:
                frame = router.recv(_NOBLOCK, copy=False)
                data.append(frame)
            try:
                self._handle(identity, header, data)
            except Exception as exc:  # one bad message must not take the loop down
                logger.exception("failed to handle a request")
                reply = error_reply(-1, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
                self._send([identity, encode(reply)])
            if not _readable(router):
                return

    def _handle(self, identity: bytes, header: bytes, data: list[zmq.Frame]) -> None:
        req = decode_request(header)
        if isinstance(req, ErrorReply):
            logger.warning("rejected request %d: %s", req.id, req.message)
            self._send([identity, encode(req)])
            return
        result = self._dispatch(req, [memoryview(f.buffer) for f in data])
        if callable(result):
            self.in_flight += 1
            self._pool.submit(self._run_deferred, identity, result)
        else:
            self._send([identity, encode(result)])

    def _send(self, frames: list[Any]) -> None:
        router, last = self._router, len(frames) - 1
        try:
            for i, frame in enumerate(frames):
                flags = _NOBLOCK if i == last else _MORE
                router.send(frame, flags, copy=not isinstance(frame, zmq.Frame))
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
