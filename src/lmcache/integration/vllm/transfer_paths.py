"""How KV bytes travel between this worker's blocks and the server: one class per path.

`WorkerSide` picks a path when it registers (and again whenever it re-registers, e.g.
after a server restart) and then only calls `load`, `store` and `close` on it. Falling
back to bytes swaps the path object; no copy ever has to ask which mode it is in.

                      ┌─ SharedKVPath  store / retrieve (block ids) ──> the server maps
                      │                our /lmcache_kv_* segments and copies itself
    WorkerSide.path ──┼─ PoolPath      prepare_* ─> BlockCopier <─> L1 pool slots ─> commit
                      │                (we map the server's pool; lmcache_driven)
                      └─ BytesPath     BlockCopier <─> buffers ── store_bytes / retrieve_bytes
                                       (no shared memory: another host, another /dev/shm)

A range may end with a partial chunk (whole blocks short of a chunk; see
`lmcache.storage.keys`): every path sizes it as `BlockCopier.piece_sizes` does.

Every path moves whole blocks with `BlockCopier` (or has the server do it with the same
routine), so they agree byte for byte: a chunk stored through one path loads through
any other. A path raises on failure (`LMCacheError` for the server's refusals); turning
that into load errors or degraded mode is `WorkerSide`'s job, which keeps the paths
free of vLLM objects and testable on plain numpy arrays (tests/test_worker_paths.py).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, TypedDict

import numpy as np

from lmcache.client import LMCacheClient
from lmcache.engine.transfer import BlockCopier, skip_blocks
from lmcache.errors import LMCacheError, ServerError
from lmcache.integration.vllm.metadata import LoadSpec, StoreSpec
from lmcache.protocol.messages import KVMemory, Pong, ShmMemory, StoreReply, WorkerCopy
from lmcache.storage.shm import ShmSegment


class NoSharedMemory(LMCacheError):
    """This path cannot reach the server's memory (or the server ours): use bytes instead.
    The message says why, for the one warning that the fallback logs."""


@dataclass(frozen=True)
class Held:
    """What the server holds of a stored range: ``tokens`` of it from its start (fewer
    than the range when L1 was full of locked objects), and, when the store asked for
    them, the range's chunk keys (to match removals in the server's KV event log)."""

    tokens: int
    keys: tuple[bytes, ...] = ()


class _Span(TypedDict):
    request_id: str
    instance_id: int
    tokens: list[int]
    start: int
    end: int
    cache_salt: str


class StagedLoad:
    """A load whose bytes are already at hand (lent pool slots, or received frames), to be
    copied into our blocks by layers: `copy_layers` in any runs that cover every layer
    once, then `finish` (True once every layer was copied, else False: nothing is kept).

        stage (RPC, before the forward) ─> copy_layers(0..k) ─> ... ─> finish(ok)
    """

    def __init__(
        self,
        copier: BlockCopier,
        block_ids: np.ndarray,
        chunks: Sequence[np.ndarray],
        skip_blocks: int,
        on_finish: Callable[[bool], None] | None = None,
    ) -> None:
        self.copier = copier
        self._ids = block_ids
        self._chunks = chunks
        self._skip = skip_blocks
        self._on_finish = on_finish

    def copy_layers(self, layers: range) -> None:
        for i, src in enumerate(self._chunks):
            self.copier.scatter_layers(src, self._ids, i, self._skip, layers)

    def finish(self, ok: bool) -> None:
        """Give back what the load borrowed (the server's slots); only the first call
        acts. May raise the server's error (the slots then expire with their lease)."""
        on_finish, self._on_finish = self._on_finish, None
        if on_finish is not None:
            on_finish(ok)

    def run(self) -> None:
        """The whole load at once (the synchronous path)."""
        ok = False
        try:
            self.copy_layers(range(self.copier.layout.num_layers))
            ok = True
        finally:
            self.finish(ok)


class TransferPath(ABC):
    """Moves whole chunks of a range between our KV blocks and the server.

    ``memory`` is what registration announces, so the server knows which requests this
    engine will send. `load` leaves the range's first ``skip_tokens`` alone (vLLM already
    has them); `store` writes chunks the server does not have yet and answers what the
    server now holds of the range (`Held`: what KV events announce).
    """

    uses_bytes: ClassVar[bool] = False
    name: ClassVar[str]

    def __init__(self, client: LMCacheClient, instance_id: int, copier: BlockCopier) -> None:
        self.client = client
        self.instance_id = instance_id
        self.copier = copier

    @property
    @abstractmethod
    def memory(self) -> KVMemory: ...

    def load(self, spec: LoadSpec) -> None:
        staged = self.stage_load(spec)
        if staged is not None:
            staged.run()

    @abstractmethod
    def stage_load(self, spec: LoadSpec) -> StagedLoad | None:
        """Get the range's bytes within reach and return what is left to copy, or None
        when the load is already done (a path whose server copies itself)."""

    @abstractmethod
    def store(self, spec: StoreSpec, *, want_keys: bool = False) -> Held: ...

    def close(self) -> None:  # noqa: B027 - optional: only a path that maps something has work
        """Drop what this path mapped; our own KV memory is not the path's to free."""

    # ----- shared by the paths ----------------------------------------------------------

    def _span(self, spec: LoadSpec | StoreSpec) -> _Span:
        """The arguments that every range request of the client takes."""
        return _Span(
            request_id=spec.request_id, instance_id=self.instance_id, tokens=spec.tokens,
            start=spec.start, end=spec.end, cache_salt=spec.cache_salt,
        )  # fmt: skip

    @staticmethod
    def _ids(spec: LoadSpec | StoreSpec) -> np.ndarray:
        return np.asarray(spec.block_ids, dtype=np.int64)

    def _sizes(self, spec: LoadSpec | StoreSpec) -> list[int]:
        """Byte sizes of the chunks of the range ``[start, end)``: whole chunks, then a
        partial one of whole blocks when ``end`` is not on a chunk (the server sizes them
        alike)."""
        return self.copier.piece_sizes((spec.end - spec.start) // self.copier.layout.block_size)

    def _skip_blocks(self, spec: LoadSpec) -> int:
        """Blocks at the start of the range that a load leaves alone (as the server counts)."""
        return skip_blocks(spec.skip_tokens, spec.end - spec.start, self.copier.layout.block_size)

    def _staged(
        self,
        spec: LoadSpec,
        chunks: Sequence[np.ndarray],
        on_finish: Callable[[bool], None] | None = None,
    ) -> StagedLoad:
        sizes = self._sizes(spec)
        if [c.nbytes for c in chunks] != sizes:
            raise ServerError(
                f"the server sent chunks of {[c.nbytes for c in chunks]} bytes for a range of "
                f"chunks of {sizes}"
            )
        return StagedLoad(self.copier, self._ids(spec), chunks, self._skip_blocks(spec), on_finish)


class SharedKVPath(TransferPath):
    """engine_driven: our KV tensors live in /lmcache_kv_* segments that the server maps,
    so a request names block ids and the server copies them itself (zero copy here)."""

    name = "shared KV segments"

    def __init__(
        self,
        client: LMCacheClient,
        instance_id: int,
        copier: BlockCopier,
        segments: Sequence[ShmSegment],
    ) -> None:
        super().__init__(client, instance_id, copier)
        self._memory = ShmMemory(
            segments=[s.name for s in segments], tokens=[s.token.hex() for s in segments]
        )

    @property
    def memory(self) -> KVMemory:
        return self._memory

    def stage_load(self, spec: LoadSpec) -> None:
        self.client.retrieve(
            **self._span(spec), block_ids=spec.block_ids, skip_tokens=spec.skip_tokens
        )

    def store(self, spec: StoreSpec, *, want_keys: bool = False) -> Held:
        reply = self.client.store(**self._span(spec), block_ids=spec.block_ids, want_keys=want_keys)
        return _held(reply, spec)


class PoolPath(TransferPath):
    """lmcache_driven: we map the server's L1 pool and copy chunks into and out of the
    slots that a prepare request lends us; the commit tells the server we are done
    (``success=False`` gives the slots back untouched)."""

    name = "the server's L1 pool"

    def __init__(
        self, client: LMCacheClient, instance_id: int, copier: BlockCopier, pool: ShmSegment
    ) -> None:
        super().__init__(client, instance_id, copier)
        self.pool = pool

    @classmethod
    def attach(
        cls, client: LMCacheClient, instance_id: int, copier: BlockCopier, pong: Pong
    ) -> PoolPath:
        """Map the pool that ``pong`` announces, or raise `NoSharedMemory`."""
        if not pong.l1_pool:  # the server tells its pool only to local peers of its own uid
            raise NoSharedMemory("the server did not offer its L1 pool to this connection")
        try:
            pool = ShmSegment.attach(pong.l1_pool, bytes.fromhex(pong.l1_pool_seal))
        except (OSError, ValueError) as exc:
            raise NoSharedMemory(
                f"cannot map the server's L1 pool {pong.l1_pool!r}: {exc}"
            ) from None
        return cls(client, instance_id, copier, pool)

    def serves(self, pong: Pong) -> bool:
        """Whether ``pong`` announces the pool we have mapped (no need to map it again)."""
        return self.pool.name == pong.l1_pool and self.pool.token.hex() == pong.l1_pool_seal

    @property
    def memory(self) -> KVMemory:
        return WorkerCopy()

    def stage_load(self, spec: LoadSpec) -> StagedLoad:
        """The server lends (and pins) the chunks' slots; `StagedLoad.finish` commits."""
        prepared = self.client.prepare_retrieve(**self._span(spec))
        client, iid, tid = self.client, self.instance_id, prepared.transfer_id
        try:
            sizes = self._check_pieces(prepared.chunk_bytes, self._sizes(spec))
            if len(prepared.offsets) != len(sizes):
                raise ServerError(
                    f"the server lent {len(prepared.offsets)} slots for {len(sizes)} chunks"
                )
            pool = self.pool.array
            slots = [pool[o : o + n] for o, n in zip(prepared.offsets, sizes, strict=True)]

            def commit(ok: bool) -> None:
                client.commit(iid, tid, success=ok)

            return self._staged(spec, slots, commit)
        except BaseException:
            client.commit(iid, tid, success=False)
            raise

    def store(self, spec: StoreSpec, *, want_keys: bool = False) -> Held:
        prepared = self.client.prepare_store(**self._span(spec), want_keys=want_keys)
        ok = False
        try:
            # -1: the server has that chunk already; a short list: L1 is full (no_space).
            sizes = self._check_pieces(prepared.chunk_bytes, self._sizes(spec))
            pool, places = self.pool.array, zip(prepared.offsets, sizes, strict=False)
            slots = [(i, pool[o : o + n]) for i, (o, n) in enumerate(places) if o >= 0]
            self.copier.gather_range(self._ids(spec), slots)
            ok = True
        finally:
            self.client.commit(self.instance_id, prepared.transfer_id, success=ok)
        tokens = spec.end - spec.start
        if prepared.no_space:  # L1 full: the chunks that got a slot (or were cached)
            chunk_tokens = self.copier.blocks_per_chunk * self.copier.layout.block_size
            tokens = min(tokens, len(prepared.offsets) * chunk_tokens)
        return Held(tokens, tuple(prepared.keys))

    def _check_pieces(self, chunk_bytes: int, sizes: list[int]) -> list[int]:
        """``sizes``, once the server's whole-chunk size agrees with ours (it sizes partial
        chunks from the same layout, so they agree when whole ones do)."""
        if chunk_bytes != self.copier.chunk_bytes:
            raise ServerError(
                f"the server's chunks hold {chunk_bytes} bytes, ours {self.copier.chunk_bytes}"
            )
        return sizes

    def close(self) -> None:
        # A copy still running keeps its slices of the mapping alive (see ShmSegment.unmap).
        self.pool.close()


class BytesPath(TransferPath):
    """No shared memory either way: chunk bytes travel as ZMQ data frames. Slower (two
    extra copies and the socket), but it works across hosts and /dev/shm namespaces."""

    uses_bytes = True
    name = "bytes in the messages"

    @property
    def memory(self) -> KVMemory:
        return WorkerCopy()

    def stage_load(self, spec: LoadSpec) -> StagedLoad:
        frames = self.client.retrieve_bytes(**self._span(spec))
        return self._staged(spec, [np.frombuffer(f, dtype=np.uint8) for f in frames])

    def store(self, spec: StoreSpec, *, want_keys: bool = False) -> Held:
        bufs = [np.empty(size, dtype=np.uint8) for size in self._sizes(spec)]
        self.copier.gather_range(self._ids(spec), enumerate(bufs))
        reply = self.client.store_bytes(**self._span(spec), chunks=bufs, want_keys=want_keys)
        return _held(reply, spec)


def _held(reply: StoreReply, spec: StoreSpec) -> Held:
    """What the server holds after a store: all of the range, or (L1 full) the written
    and already cached prefix; nothing when some chunks were cached under another layout
    (where they sit in the range is not told)."""
    tokens = spec.end - spec.start
    if reply.conflict_tokens:
        tokens = 0
    elif reply.no_space:
        tokens = min(tokens, reply.stored_tokens + reply.cached_tokens)
    return Held(tokens, tuple(reply.keys))
