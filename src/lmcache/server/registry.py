"""Registered engine workers: one entry per KV-cache rank (instance id).

Each registration has an owner (the peer that made it, see `lmcache.transport.peers`):
only that owner may replace or remove it. The server maps only segments named like an
engine's KV segment (``/lmcache_kv_<pid>_<idx>``), of its own uid, whose seal matches
and whose size holds the layout; the number of registrations is bounded.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lmcache.defaults import COPY_THREADS
from lmcache.engine.transfer import KVTransfer, ShmTransfer
from lmcache.errors import BadRequestError, ForbiddenError, UnknownEngineError
from lmcache.protocol.messages import KVLayout, KVMemory, RegisterKV, ShmMemory
from lmcache.storage.chunk_store import ChunkLayout
from lmcache.storage.keys import MAX_SALT_LEN, Namespace
from lmcache.storage.shm import ShmSegment

logger = logging.getLogger(__name__)

MAX_WORLD_SIZE = 4096
MAX_NAME_LEN = 512
MAX_ENGINES = 1024  # registrations held at once (each may map segments)
# Engines' KV segments only (engine/shm_kv.py): never the L1 pool or anything else.
KV_SEGMENT_RE = re.compile(r"^/?lmcache_kv_[0-9]{1,10}_[0-9]{1,10}$")


@dataclass(eq=False)
class Engine:
    """One registered worker and what the server needs to copy its blocks."""

    instance_id: int
    model_name: str
    world_size: int
    rank: int
    dtype: str
    kv_spec: str
    layout: KVLayout
    transfer: KVTransfer | None  # None: the worker copies itself (prepare/commit)
    blocks_per_chunk: int
    owner: str = ""
    pid: int | None = None  # its process, as the kernel reported it (None: unknown)
    registered_at: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.monotonic)

    @property
    def chunk_shape(self) -> tuple[int, int, int, int]:
        lay = self.layout
        return (lay.num_layers, lay.planes, self.blocks_per_chunk, lay.block_bytes // lay.planes)

    @property
    def chunk_bytes(self) -> int:
        return self.layout.num_layers * self.blocks_per_chunk * self.layout.block_bytes

    @property
    def layout_tag(self) -> bytes:
        """Identifies the byte layout of this engine's chunks (see `L1Cache` tags)."""
        return repr(self.chunk_shape).encode()

    @property
    def chunk_layout(self) -> ChunkLayout:
        return ChunkLayout(self.layout_tag, self.chunk_bytes)

    def bytes_of(self, tokens: int) -> int:
        """Bytes that ``tokens`` (whole blocks) of this engine's KV take in L1."""
        lay = self.layout
        return tokens // lay.block_size * lay.num_layers * lay.block_bytes

    def tail_layout(self, range_end: int, chunk_size: int) -> ChunkLayout | None:
        """The layout of the partial chunk that ends a range at ``range_end`` (None if it
        ends on a chunk): fewer blocks, so another size and another tag (a reader that
        expects another block count sees a miss, never misread bytes)."""
        tail = range_end % chunk_size
        if not tail:
            return None
        lay = self.layout
        if tail % lay.block_size:  # KeySpace.range_keys refuses these first
            raise BadRequestError(f"a partial chunk of {tail} tokens is not whole blocks")
        blocks = tail // lay.block_size
        shape = (lay.num_layers, lay.planes, blocks, lay.block_bytes // lay.planes)
        return ChunkLayout(repr(shape).encode(), lay.num_layers * blocks * lay.block_bytes)

    def namespace(self, cache_salt: str) -> Namespace:
        """Where this rank's keys live (see `lmcache.storage.keyspace.KeySpace`)."""
        return Namespace(
            self.model_name, self.world_size, self.rank, self.dtype, self.kv_spec, cache_salt
        )

    def segment_names(self) -> list[str]:
        """The shared-memory segments this registration maps (none for worker copies)."""
        segments = getattr(self.transfer, "segments", [])
        return [s.name for s in segments]

    def require_transfer(self) -> KVTransfer:
        if self.transfer is None:
            raise BadRequestError(
                f"GPU ID {self.instance_id} shares no memory with the server (lmcache_driven): "
                "use prepare_store / prepare_retrieve"
            )
        return self.transfer

    def check_block_ids(self, block_ids: list[int], expected: int) -> np.ndarray:
        if len(block_ids) != expected:
            raise BadRequestError(
                f"expected {expected} block ids for the token range, got {len(block_ids)}"
            )
        ids = np.asarray(block_ids, dtype=np.intp)
        if ids.size and (ids.min() < 0 or ids.max() >= self.layout.num_blocks):
            raise BadRequestError(
                f"block id out of range 0..{self.layout.num_blocks - 1} "
                f"(got {int(ids.min())}..{int(ids.max())})"
            )
        return ids

    def describe(self) -> dict[str, Any]:
        lay = self.layout
        return {
            "instance_id": self.instance_id,
            "model_name": self.model_name,
            "world_size": self.world_size,
            "rank": self.rank,
            "dtype": self.dtype,
            "kv_spec": self.kv_spec,
            "transfer": self.transfer.kind if self.transfer else "worker_copy",
            "owner": self.owner,
            "num_layers": lay.num_layers,
            "num_blocks": lay.num_blocks,
            "block_size": lay.block_size,
            "block_bytes": lay.block_bytes,
            "planes": lay.planes,
            "chunk_bytes": self.chunk_bytes,
            "registered_at": self.registered_at,
            "idle_s": round(time.monotonic() - self.last_seen, 3),
        }


PF_EXITING = 0x4  # include/linux/sched.h: "getting shut down"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` (of this PID namespace) exists and has not ended: a killed
    process that its parent has not waited for yet (a zombie, no thread left) has closed its
    files and sockets, and will never speak again. Its main thread alone being a zombie is
    not enough: the other threads may still run (or still be closing its files)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            status = f.read()
    except OSError:
        return True  # no procfs here: the signal test is all we have
    fields = dict(line.split(b":", 1) for line in status.splitlines() if b":" in line)
    state = fields.get(b"State", b"").strip()[:1]
    threads = fields.get(b"Threads", b"1").strip()
    return not (state in (b"Z", b"X") and threads.isdigit() and int(threads) <= 1)


def pid_exiting(pid: int) -> bool:
    """Whether process ``pid`` has begun to exit (its main thread's PF_EXITING flag in
    /proc/<pid>/stat): killed, it is still tearing its memory down and will close its files
    (and so release its segments' locks) next."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    fields = stat[stat.rfind(b")") + 2 :].split()  # after "pid (comm) ": state is field 3
    try:
        return bool(int(fields[6]) & PF_EXITING)  # field 9: flags
    except (IndexError, ValueError):
        return False


def check_identity(model_name: str, world_size: int, dtype: str, cache_salt: str = "") -> None:
    """Validate the fields that go into a namespace."""
    if not model_name or len(model_name) > MAX_NAME_LEN:
        raise BadRequestError(f"model_name must have 1..{MAX_NAME_LEN} characters")
    if not 1 <= world_size <= MAX_WORLD_SIZE:
        raise BadRequestError(f"world_size must be in 1..{MAX_WORLD_SIZE}, got {world_size}")
    if not dtype or len(dtype) > 64:
        raise BadRequestError("dtype must have 1..64 characters")
    if len(cache_salt) > MAX_SALT_LEN:
        raise BadRequestError(f"cache_salt longer than {MAX_SALT_LEN} characters")


class EngineRegistry:
    def __init__(
        self, chunk_size: int, max_chunk_bytes: int = 1 << 62, copy_threads: int = COPY_THREADS
    ) -> None:
        self.chunk_size = chunk_size
        self.max_chunk_bytes = max_chunk_bytes
        self.copy_threads = copy_threads  # --copy-threads, for each engine's ShmTransfer
        self._engines: dict[int, Engine] = {}
        self._lock = threading.Lock()

    def register(self, msg: RegisterKV, owner: str = "", pid: int | None = None) -> Engine:
        check_identity(msg.model_name, msg.world_size, msg.dtype)
        self._check_room(msg.instance_id, owner)
        if not 0 <= msg.rank < msg.world_size:
            raise BadRequestError(f"rank {msg.rank} outside world_size {msg.world_size}")
        lay = msg.layout
        if lay.block_size <= 0 or self.chunk_size % lay.block_size:
            raise BadRequestError(
                f"the server's chunk size ({self.chunk_size} tokens) must be a multiple of the "
                f"engine's block size ({lay.block_size}); restart the server with a matching "
                "--chunk-size"
            )
        if (
            lay.num_layers * (self.chunk_size // lay.block_size) * lay.block_bytes
            > self.max_chunk_bytes
        ):
            raise BadRequestError(
                f"one {self.chunk_size}-token chunk of this layout is larger than the L1 pool "
                f"({self.max_chunk_bytes} bytes)"
            )
        transfer = self._open(msg.memory, lay, self.chunk_size // lay.block_size)
        engine = Engine(
            instance_id=msg.instance_id,
            model_name=msg.model_name,
            world_size=msg.world_size,
            rank=msg.rank,
            dtype=msg.dtype,
            kv_spec=msg.kv_spec,
            layout=lay,
            transfer=transfer,
            blocks_per_chunk=self.chunk_size // lay.block_size,
            owner=owner,
            pid=pid,
        )
        with self._lock:
            old = self._engines.get(msg.instance_id)
            taken = old is not None and old.owner != owner  # registered meanwhile by another
            if not taken:
                self._engines[msg.instance_id] = engine
        if taken:
            if transfer is not None:
                transfer.close()
            raise ForbiddenError(f"GPU ID {msg.instance_id} belongs to another client")
        if old is not None and old.transfer is not None:
            old.transfer.close()
        return engine

    def _check_room(self, instance_id: int, owner: str) -> None:
        with self._lock:
            old = self._engines.get(instance_id)
            if old is not None and old.owner != owner:
                raise ForbiddenError(f"GPU ID {instance_id} belongs to another client")
            if old is None and len(self._engines) >= MAX_ENGINES:
                raise BadRequestError(
                    f"too many registered engines ({MAX_ENGINES}); silent ones are "
                    "unregistered after --engine-timeout-s"
                )

    def _open(self, memory: KVMemory, layout: KVLayout, blocks_per_chunk: int) -> KVTransfer | None:
        if not isinstance(memory, ShmMemory):
            if layout.num_layers <= 0 or layout.block_bytes <= 0 or layout.planes <= 0:
                raise BadRequestError("layout needs positive num_layers, block_bytes and planes")
            if layout.block_bytes % layout.planes:
                raise BadRequestError("layout.block_bytes must divide evenly into planes")
            return None
        if not memory.segments or len(memory.segments) > 4096:
            raise BadRequestError("memory.segments must list 1..4096 segment names")
        if len(memory.tokens) != len(memory.segments):
            raise BadRequestError("memory.tokens must hold one seal per segment")
        for name in memory.segments:
            if not KV_SEGMENT_RE.match(name):
                raise ForbiddenError(
                    f"segment {name[:100]!r} is not an engine KV segment "
                    "(/lmcache_kv_<pid>_<idx>): the server maps nothing else"
                )
        segments: list[ShmSegment] = []
        try:
            for name, token in zip(memory.segments, memory.tokens, strict=True):
                try:
                    seal = bytes.fromhex(token)
                except ValueError:
                    raise BadRequestError(f"seal of segment {name!r} is not hex") from None
                try:
                    segments.append(ShmSegment.attach(name, seal))
                except FileNotFoundError:
                    raise BadRequestError(
                        f"shared-memory segment {name!r} does not exist"
                    ) from None
                except (ValueError, OSError) as exc:
                    raise BadRequestError(f"cannot map segment {name!r}: {exc}") from None
            try:
                return ShmTransfer(layout, segments, blocks_per_chunk, self.copy_threads)
            except ValueError as exc:
                raise BadRequestError(f"invalid KV layout: {exc}") from None
        except BaseException:
            for segment in segments:
                segment.close()
            raise

    def unregister(self, instance_id: int, only: Engine | None = None) -> bool:
        """Forget an engine (``only``: if that registration is still the current one)."""
        with self._lock:
            engine = self._engines.get(instance_id)
            if engine is None or (only is not None and engine is not only):
                return False
            del self._engines[instance_id]
        if engine.transfer is not None:
            engine.transfer.close()
        return True

    def get(self, instance_id: int) -> Engine:
        engine = self._engines.get(instance_id)
        if engine is None:
            raise UnknownEngineError(
                f"no KV cache registered for GPU ID {instance_id} (register it again; "
                "the server may have restarted)"
            )
        engine.last_seen = time.monotonic()
        return engine

    def peek(self, instance_id: int) -> Engine | None:
        return self._engines.get(instance_id)

    def touch(self, instance_id: int | None, owner: str | None = None) -> bool:
        """Note that an engine is alive (only its owner's pings count, if given)."""
        engine = self._engines.get(instance_id) if instance_id is not None else None
        if engine is None or (owner is not None and engine.owner != owner):
            return False
        engine.last_seen = time.monotonic()
        return True

    def find(
        self, model_name: str, world_size: int, dtype: str, kv_spec: str
    ) -> list[Engine] | None:
        """One registered engine per rank of this model identity, or None if a rank is missing."""
        by_rank: dict[int, Engine] = {}
        for e in self.engines():
            if (e.model_name, e.world_size, e.dtype, e.kv_spec) == (
                model_name,
                world_size,
                dtype,
                kv_spec,
            ):
                by_rank.setdefault(e.rank, e)
        if len(by_rank) != world_size:
            return None
        return [by_rank[r] for r in range(world_size)]

    def engines(self) -> list[Engine]:
        with self._lock:
            return list(self._engines.values())

    def close(self) -> None:
        for engine in self.engines():
            self.unregister(engine.instance_id)
