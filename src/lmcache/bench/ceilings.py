"""Ceilings: what each server result is divided by, measured in the same run.

    numpy copy             np.copyto of the same bytes between pre-faulted buffers, one
                           np.copyto (one thread) per engine: what store/retrieve are
                           judged against (the physical ceiling)
    in-process gather      the server's own copy routine (`BlockCopier`, default threads),
    / scatter              chunk by chunk, same block ids, into (out of) pre-faulted shared
                           memory: shown beside it, not judged
    raw pyzmq round trip   DEALER -> ROUTER echo process, same frame sizes, no server
    raw file / redis-py    open+write / readinto, SET / GET of the same object sizes

Run as ``python -m lmcache.bench.ceilings PORT REPLY_BYTES`` it is the echo process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from lmcache.engine.transfer import BlockCopier
from lmcache.processes import free_port
from lmcache.protocol.messages import KVLayout
from lmcache.storage.shm import ShmSegment


def prefaulted_segment(nbytes: int, tag: str) -> ShmSegment:
    """A tmpfs segment like the server's L1 pool (created with MAP_POPULATE)."""
    return ShmSegment.create(f"/lmcache_bench_{os.getpid()}_{tag}", nbytes)


class PlainCopy:
    """np.copyto of ``nbytes`` between two pre-faulted buffers."""

    def __init__(self, nbytes: int) -> None:
        self.a = np.ones(nbytes, dtype=np.uint8)
        self.b = np.full(nbytes, 2, dtype=np.uint8)

    def copy(self) -> None:
        np.copyto(self.b, self.a)


class InProcessCopy:
    """The server's copy loop run here: same copier type, same chunking, same ids."""

    def __init__(
        self, layout: KVLayout, arrays: list[np.ndarray], chunk_blocks: int, blocks: int, tag: str
    ) -> None:
        self.copier = BlockCopier(layout, arrays, chunk_blocks)
        self.chunk_bytes = self.copier.chunk_bytes
        self.chunks = blocks // chunk_blocks
        self.pool = prefaulted_segment(self.chunks * self.chunk_bytes, tag)

    def _chunk(self, i: int) -> np.ndarray:
        return self.pool.array[i * self.chunk_bytes : (i + 1) * self.chunk_bytes]

    def gather(self, block_ids: np.ndarray) -> None:
        self.copier.gather_range(block_ids, ((i, self._chunk(i)) for i in range(self.chunks)))

    def scatter(self, block_ids: np.ndarray) -> None:
        self.copier.scatter_range(block_ids, [self._chunk(i) for i in range(self.chunks)])

    def close(self) -> None:
        self.copier.release()
        self.pool.close()
        self.pool.unlink()


# ----- raw pyzmq ---------------------------------------------------------------------------


def echo_forever(port: int, reply_bytes: int) -> None:
    """ROUTER answering every frame with its first ``reply_bytes`` bytes; b"stop" ends it."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(f"tcp://127.0.0.1:{port}")
    while True:
        identity, frame = sock.recv_multipart()
        if frame == b"stop":
            sock.send_multipart([identity, b"bye"])
            break
        sock.send_multipart([identity, frame[:reply_bytes]])
    sock.close(linger=0)
    ctx.term()


class RawZmq:
    """A DEALER doing plain send/recv round trips to the echo process."""

    def __init__(self, port: int, payload: bytes) -> None:
        self.sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVTIMEO, 20_000)
        self.sock.connect(f"tcp://127.0.0.1:{port}")
        self.payload = payload

    def call(self) -> None:
        self.sock.send(self.payload)
        self.sock.recv()

    def close(self) -> None:
        self.sock.close(linger=0)


class EchoProcess:
    def __init__(self, reply_bytes: int) -> None:
        self.port = free_port()
        cmd = [sys.executable, "-m", "lmcache.bench.ceilings", str(self.port), str(reply_bytes)]
        self.proc = subprocess.Popen(cmd)
        probe = RawZmq(self.port, b"ready?")  # a DEALER queues until the ROUTER binds
        try:
            probe.call()
        finally:
            probe.close()

    def stop(self) -> None:
        raw = RawZmq(self.port, b"stop")
        try:
            raw.call()
        except zmq.Again:
            self.proc.terminate()
        finally:
            raw.close()
        self.proc.wait(timeout=10)


# ----- raw storage -------------------------------------------------------------------------


class RawFiles:
    """One file per object: open+write+close, then open+readinto a pre-faulted buffer."""

    def __init__(self, directory: Path, objects: int, nbytes: int) -> None:
        self.dir = directory / "raw-ceiling"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.objects, self.data = objects, np.ones(nbytes, dtype=np.uint8)
        self.out = np.zeros(nbytes, dtype=np.uint8)

    def write(self) -> float:
        t0 = time.perf_counter()
        for i in range(self.objects):
            with open(self.dir / f"{i}", "wb") as f:
                f.write(self.data.data)
        return time.perf_counter() - t0

    def read(self) -> float:
        t0 = time.perf_counter()
        for i in range(self.objects):
            with open(self.dir / f"{i}", "rb") as f:
                f.readinto(self.out.data)
        return time.perf_counter() - t0

    def close(self) -> None:
        for p in self.dir.iterdir():
            p.unlink()
        self.dir.rmdir()


class RawRedis:
    """redis-py SET / GET of the same object sizes, one key each, no framing."""

    def __init__(self, url: str, objects: int, nbytes: int) -> None:
        import redis

        self.r: Any = redis.Redis.from_url(url)
        self.objects, self.data = objects, np.ones(nbytes, dtype=np.uint8).tobytes()

    def write(self) -> float:
        t0 = time.perf_counter()
        for i in range(self.objects):
            self.r.set(f"raw-ceiling:{i}", self.data)
        return time.perf_counter() - t0

    def read(self) -> float:
        t0 = time.perf_counter()
        for i in range(self.objects):
            self.r.get(f"raw-ceiling:{i}")
        return time.perf_counter() - t0

    def close(self) -> None:
        self.r.delete(*[f"raw-ceiling:{i}" for i in range(self.objects)])
        self.r.close()


if __name__ == "__main__":
    echo_forever(int(sys.argv[1]), int(sys.argv[2]))
