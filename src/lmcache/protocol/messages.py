"""Wire messages between engines and the server.

Every message is one msgpack frame decoded straight into a typed `msgspec.Struct`
(plus raw data frames for the bytes-in-the-message ops, `StoreBytes`/`RetrieveBytes`);
decoding builds plain data only, so nothing on the wire can run code. The ``op``
field selects the message type; ``id`` is chosen by the client and echoed in
the reply, so a client can match replies to requests.

    client (DEALER)                               server (ROUTER)
      Lookup{id=7, op="lookup", ...}  ──────────>  answered on the socket loop
      <──────────  LookupReply{id=7, op="lookup_result", hit_tokens=512}
      Store{id=8, op="store", ...}    ──────────>  copied on a worker thread
      <──────────  StoreReply{id=8, op="store_result", stored_tokens=768}
      Bogus{id=9, op="nope"}          ──────────>
      <──────────  ErrorReply{id=9, op="error", code="bad_request", message=...}

Token ids travel as little-endian uint32 bytes (`encode_tokens`): 4 bytes a
token, no per-token msgpack work on either side.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Annotated

import msgspec
import numpy as np
from msgspec import Meta

# 2: lookups may ask for partial last chunks (`Lookup.block_size`) and ranges may end on an
# engine block inside a chunk. A protocol-1 server rejects both, so the versions must match.
# 3: `PollKVEvents`, and stores that ask for their chunk keys (``want_keys``): a protocol-2
# server refuses both (unknown op, unknown field).
PROTOCOL_VERSION = 3

# Bounded integers: anything outside is a decode error (bad_request), never an overflow
# deeper down. Generous, but far below int64 so sums and products stay exact.
Tokens = Annotated[int, Meta(ge=0, le=1 << 40)]  # token positions and counts
Size = Annotated[int, Meta(ge=0, le=1 << 48)]  # byte sizes, offsets and strides
Count = Annotated[int, Meta(ge=0, le=1 << 31)]  # layers, blocks, ranks, block ids
EngineId = Annotated[int, Meta(ge=-(1 << 63), le=(1 << 63) - 1)]

# Bounded fields (limits in the README, "Limits"): a message beyond them is a decode
# error (bad_request) before any work, so no single message can hold much memory or
# keep the socket loop busy (the largest, 2M tokens, hashes in ~20 ms).
MAX_TOKENS = 1 << 21  # tokens per request (8 MiB on the wire)
MAX_REQUEST_ID = 512  # characters
MAX_NAME = 512  # model names, segment names
MAX_SPEC = 1024  # kv_spec, dtype
MAX_LIST = 1 << 17  # layers, block ids of one request (2M tokens / 16-token blocks)
MAX_KV_EVENTS = 4096  # records of one poll_kv_events answer
RequestIdField = Annotated[str, Meta(max_length=MAX_REQUEST_ID)]
NameField = Annotated[str, Meta(max_length=MAX_NAME)]
SpecField = Annotated[str, Meta(max_length=MAX_SPEC)]
SaltField = Annotated[str, Meta(max_length=256)]  # = storage.keys.MAX_SALT_LEN
TokenBytes = Annotated[bytes, Meta(max_length=MAX_TOKENS * 4)]


class ErrorCode(enum.StrEnum):
    BAD_REQUEST = "bad_request"
    UNKNOWN_ENGINE = "unknown_engine"
    MISS = "miss"
    NO_SPACE = "no_space"
    TRANSFER_FAILED = "transfer_failed"
    FORBIDDEN = "forbidden"  # this peer may not do that (see README, "Threat model")
    INTERNAL = "internal"


class Message(msgspec.Struct, frozen=True, tag_field="op", forbid_unknown_fields=True):
    id: int


# ----- how an engine's KV memory is laid out and shared --------------------------------


class LayerPlacement(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Where one layer's blocks start: segment index and byte offset in it."""

    segment: Count
    offset: Size


class KVLayout(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Geometry of a paged KV cache, as opaque bytes.

    Block ``b`` of plane ``p`` (K/V, or 1 plane for fused layouts) of layer ``l``
    occupies ``block_bytes // planes`` contiguous bytes at
    ``layers[l].offset + p * plane_stride + b * block_stride`` in its segment.
    """

    num_layers: Count
    num_blocks: Count
    block_size: Count  # tokens per block
    block_bytes: Size  # bytes of one block of one layer, all planes
    block_stride: Size
    layers: Annotated[list[LayerPlacement], Meta(max_length=MAX_LIST)]
    planes: Count = 1
    plane_stride: Size = 0


class ShmMemory(msgspec.Struct, frozen=True, tag="shm", forbid_unknown_fields=True):
    """The engine's KV tensors live in named POSIX shared-memory segments.

    ``tokens[i]`` (hex) is the seal of ``segments[i]`` (see `lmcache.storage.shm`): the
    server maps a segment only if its seal matches.
    """

    segments: Annotated[list[NameField], Meta(max_length=4096)]
    tokens: Annotated[list[Annotated[str, Meta(max_length=64)]], Meta(max_length=4096)]


class WorkerCopy(msgspec.Struct, frozen=True, tag="worker_copy", forbid_unknown_fields=True):
    """The engine shares nothing: its worker copies chunks into and out of the
    server's L1 pool itself (``lmcache_driven``), with prepare/commit requests."""


KVMemory = ShmMemory | WorkerCopy  # CUDA IPC and in-message bytes join this union later


# ----- requests -------------------------------------------------------------------------


class Ping(Message, frozen=True, tag="ping"):
    instance_id: EngineId | None = None


class RegisterKV(Message, frozen=True, tag="register"):
    instance_id: EngineId
    model_name: NameField
    world_size: Count
    rank: Count
    dtype: SpecField
    layout: KVLayout
    memory: KVMemory
    kv_spec: SpecField = ""


class UnregisterKV(Message, frozen=True, tag="unregister"):
    instance_id: EngineId


class Lookup(Message, frozen=True, tag="lookup"):
    """Find (and read-lock) the longest cached prefix of ``tokens`` for all ranks.

    ``block_size``: the engine's block size in tokens; after the whole chunks, the hit may
    go on into a partial chunk of whole blocks (0: whole chunks only)."""

    request_id: RequestIdField
    model_name: NameField
    world_size: Count
    dtype: SpecField
    tokens: TokenBytes
    kv_spec: SpecField = ""
    cache_salt: SaltField = ""
    block_size: Count = 0


class QueryLookup(Message, frozen=True, tag="query_lookup"):
    request_id: RequestIdField


class FreeLookup(Message, frozen=True, tag="free_lookup"):
    """Release lookup locks on chunks in ``[start, end)`` tokens (end None = all)."""

    request_id: RequestIdField
    start: Tokens = 0
    end: Tokens | None = None


class ChunkRange(Message, frozen=True, kw_only=True):
    """Chunks ``[start, end)`` of a request, for one engine rank.

    ``start`` is chunk-aligned; ``end`` is too, or ends the range with a partial chunk of
    whole engine blocks (its bytes are that many blocks; see `lmcache.storage.keys`).
    ``tokens`` holds at least the first ``end`` tokens of the sequence (chunk keys
    chain over everything before them). Every data request below is one of these.
    """

    request_id: RequestIdField
    instance_id: EngineId
    tokens: TokenBytes
    start: Tokens
    end: Tokens
    cache_salt: SaltField = ""


# CLOCK_MONOTONIC seconds (system-wide on Linux, so one host's processes agree) by which
# the server must have started a copy of the engine's own blocks; 0 = no limit. After it,
# the engine has stopped waiting and may reuse the blocks: a late copy would read blocks
# that now hold other KV (a store) or overwrite blocks in use (a retrieve).
StartBy = Annotated[float, Meta(ge=0)]


class Store(ChunkRange, frozen=True, kw_only=True, tag="store"):
    """The server copies the range's blocks into L1 (one block id per engine block).
    ``want_keys``: the reply names the range's chunk keys (to match `PollKVEvents`)."""

    block_ids: Annotated[list[Count], Meta(max_length=MAX_LIST)]
    start_by: StartBy = 0.0
    want_keys: bool = False


class Retrieve(ChunkRange, frozen=True, kw_only=True, tag="retrieve"):
    """The server copies cached chunks into the blocks, leaving the first
    ``skip_tokens`` (already in the engine's own cache) untouched."""

    block_ids: Annotated[list[Count], Meta(max_length=MAX_LIST)]
    skip_tokens: Tokens = 0
    start_by: StartBy = 0.0


class PrepareStore(ChunkRange, frozen=True, kw_only=True, tag="prepare_store"):
    """Reserve L1 slots for the range; the worker writes them, then commits.
    ``want_keys`` as for `Store`."""

    want_keys: bool = False


class PrepareRetrieve(ChunkRange, frozen=True, kw_only=True, tag="prepare_retrieve"):
    """Lock the cached chunks and say where they are; the worker reads them, then commits."""


class StoreBytes(ChunkRange, frozen=True, kw_only=True, tag="store_bytes"):
    """Store chunks whose bytes follow as data frames, one per chunk (for engines that
    share no memory with the server, e.g. on another host). ``want_keys`` as for `Store`."""

    want_keys: bool = False


class RetrieveBytes(ChunkRange, frozen=True, kw_only=True, tag="retrieve_bytes"):
    """Return the cached chunks as data frames after the reply, one per chunk."""


class Commit(Message, frozen=True, tag="commit"):
    """Finish a prepared transfer. ``success=False`` discards a store's slots."""

    instance_id: EngineId
    transfer_id: EngineId
    success: bool = True


class EndSession(Message, frozen=True, tag="end_session"):
    request_id: RequestIdField


class Clear(Message, frozen=True, tag="clear"):
    pass


class PollKVEvents(Message, frozen=True, tag="poll_kv_events"):
    """The server's KV event log (``--kv-event-log-size``) after sequence number ``after``
    (0: from the oldest record kept), at most ``limit`` records. Local peers only: the
    log names every tenant's chunk keys."""

    after: Annotated[int, Meta(ge=0, le=1 << 62)] = 0
    limit: Annotated[int, Meta(ge=1, le=MAX_KV_EVENTS)] = MAX_KV_EVENTS


Request = (
    Ping
    | RegisterKV
    | UnregisterKV
    | Lookup
    | QueryLookup
    | FreeLookup
    | Store
    | Retrieve
    | PrepareStore
    | PrepareRetrieve
    | Commit
    | StoreBytes
    | RetrieveBytes
    | EndSession
    | Clear
    | PollKVEvents
)
REQUEST_OPS = frozenset(t.__struct_config__.tag for t in Request.__args__)


# ----- replies --------------------------------------------------------------------------


class Ok(Message, frozen=True, tag="ok"):
    pass


class ErrorReply(Message, frozen=True, tag="error"):
    code: str
    message: str


class Pong(Message, frozen=True, tag="pong"):
    server_token: str  # new on every server start: a change means "register again"
    chunk_size: int
    version: str
    protocol: int = PROTOCOL_VERSION
    engine_registered: bool = False
    # Only for local peers of an allowed uid (who could open the pool anyway): the L1
    # pool's segment and its seal, which proves the right segment was found.
    l1_pool: str = ""
    l1_pool_seal: str = ""
    # The server's Unix-socket endpoint (``ipc://...``): engines on this host switch to
    # it, where the kernel tells the server their uid. Empty if it has none.
    local_endpoint: str = ""
    trusted: bool = True  # False: this connection may only ping (see README, "Threat model")


class LookupReply(Message, frozen=True, tag="lookup_result"):
    hit_tokens: int | None  # None: still looking (ask again with QueryLookup)


class StoreReply(Message, frozen=True, tag="store_result"):
    stored_tokens: int  # newly written
    cached_tokens: int  # already present (or being written by someone else)
    no_space: bool = False  # L1 full of locked objects: the rest was skipped
    conflict_tokens: int = 0  # cached under another layout for this identity: not stored
    keys: list[bytes] = []  # with ``want_keys``: the range's chunk keys, in order


class RetrieveReply(Message, frozen=True, tag="retrieve_result"):
    retrieved_tokens: int


class Prepared(Message, frozen=True, tag="prepared"):
    """Chunk ``i`` lives at ``l1_pool[offsets[i] : offsets[i] + chunk_bytes]``; a partial
    last chunk has fewer bytes (its blocks' worth, which the worker knows from its layout).

    For a store, ``-1`` marks a chunk that is already cached (do not write it) and
    the list stops early when L1 is full (``no_space``). The worker must commit
    within ``ttl_s`` seconds; after that the slots are reclaimed and the commit fails.
    """

    transfer_id: int
    offsets: list[int]
    chunk_bytes: int
    ttl_s: float
    no_space: bool = False
    keys: list[bytes] = []  # with ``want_keys``: the range's chunk keys, in order


class Committed(Message, frozen=True, tag="committed"):
    tokens: int


class KVEventRecord(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """One change of L1: chunk ``key`` became readable (``stored``) or left (``removed``:
    evicted, cleared, deleted)."""

    seq: int
    kind: str
    key: bytes


class KVEvents(Message, frozen=True, tag="kv_events"):
    """Answer to `PollKVEvents`. ``log`` names this log (a new one after a restart: poll
    from 0 again); ``lost``: records after ``after`` were dropped (the ring is bounded) or
    ``after`` is not of this log. Poll again with ``after=next``."""

    log: str
    enabled: bool
    next: int
    lost: bool = False
    records: list[KVEventRecord] = []


class ChunkData(Message, frozen=True, tag="chunk_data"):
    """Answer to `RetrieveBytes`: ``chunks`` data frames of ``chunk_bytes`` each follow (a
    partial last chunk's frame is shorter: its blocks' worth)."""

    chunks: int
    chunk_bytes: int


Reply = (
    Ok
    | ErrorReply
    | Pong
    | LookupReply
    | StoreReply
    | RetrieveReply
    | Prepared
    | Committed
    | ChunkData
    | KVEvents
)


# ----- helpers --------------------------------------------------------------------------


def encode_tokens(tokens: Sequence[int] | np.ndarray) -> bytes:
    """Token ids → little-endian uint32 bytes (the wire form)."""
    return np.asarray(tokens, dtype="<u4").tobytes()
