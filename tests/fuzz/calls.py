"""Strategies for whole requests of every kind (as `Call`: a request and the data frames
sent after it), structurally valid, with hostile field values from `values`: about half
of them sane (good values 15 times in 16, so that they pass validation and do real work on
the real engine or one the fuzzers registered), the others anything.

Strategies never draw from the server's state (the engines the fuzzers registered, the
transfers they prepared): they draw values, then derive what depends on the state from
them, because hypothesis wants the same choices made in the same order every time."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np
from hypothesis import strategies as st

from lmcache.protocol.messages import (
    Clear,
    Commit,
    EndSession,
    FreeLookup,
    Lookup,
    Ping,
    PollKVEvents,
    PrepareRetrieve,
    PrepareStore,
    QueryLookup,
    RegisterKV,
    Request,
    Retrieve,
    RetrieveBytes,
    ShmMemory,
    Store,
    StoreBytes,
    UnregisterKV,
    WorkerCopy,
)

from ..conftest import BLOCK, CHUNK
from .corpus import Corpus
from .values import (
    MESSAGE_IDS,
    REQUEST_IDS,
    STRINGS,
    huge_layouts,
    ints,
    layouts,
    other_layouts,
    shm_memories,
    token_bytes,
)
from .wire import ENGINE_ID, MAX_FUZZ_FRAME, REAL_CHUNK_BYTES, UINT64_MAX, Call

FUZZ_ENGINE_IDS = st.integers(1, 8)  # ids the fuzzers register (and then hit) themselves
# Every request type but Clear, which would wipe the cache mid-run: it is tested once, in
# test_fuzzers.py; PollKVEvents is fuzzed in test_kv_events.py. UnregisterKV goes last, so
# that the engines RegisterKV made are there for the others.
FUZZED_KINDS: list[type] = sorted(
    (k for k in Request.__args__ if k not in (Clear, PollKVEvents)), key=lambda k: k is UnregisterKV
)


def _pick(draw: st.DrawFn, sane: bool, good: Any, hostile: st.SearchStrategy[Any]) -> Any:
    """``good`` 15 times in 16 in a sane request (so that it passes validation and does
    real work), half the time in a hostile one."""
    if sane and draw(st.integers(0, 7)):
        return good
    return draw(st.one_of(st.just(good), hostile))


@st.composite
def range_fields(draw: st.DrawFn, corpus: Corpus) -> tuple[bool, dict[str, Any]]:
    """Fields of the requests on a token range (Store, Retrieve, their prepare_* and *_bytes
    forms): near-valid ranges on real tokens and the real engine (or one the fuzzers
    registered), or anything; ``block_ids`` (for the first two). Also says if it is sane.

    What depends on the server's state (the block ids that fit a fuzzed engine's layout)
    is derived from drawn values, never drawn itself: hypothesis wants the same choices
    to be made in the same order every time."""
    sane = draw(st.booleans())
    first = draw(st.integers(0, 3))
    last = draw(st.integers(first, 3))
    engine = draw(st.one_of(st.just(ENGINE_ID), FUZZ_ENGINE_IDS))
    instance_id = _pick(draw, sane, engine, st.one_of(FUZZ_ENGINE_IDS, ints()))
    start = _pick(draw, sane, first * CHUNK, ints())
    any_end = st.one_of(ints(), st.just(start), st.just(min(start + CHUNK, UINT64_MAX)))
    fields = {
        "id": draw(MESSAGE_IDS),
        "request_id": draw(REQUEST_IDS),
        "instance_id": instance_id,
        "tokens": _pick(draw, sane, draw(st.sampled_from(corpus.tokens)), token_bytes(corpus)),
        "start": start,
        "end": _pick(draw, sane, last * CHUNK, any_end),
        "cache_salt": _pick(draw, sane, "", STRINGS),
    }
    ids = _pick(draw, sane, "fit", st.sampled_from(["near", "short", "any"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    lay = corpus.layout if instance_id == ENGINE_ID else corpus.engines.get(instance_id)
    if lay is None or lay.block_size <= 0 or CHUNK % lay.block_size:
        lay = corpus.layout
    n = (last - first) * CHUNK // lay.block_size  # block ids for the range, in its layout
    top = min(lay.num_blocks, 4096)
    if ids == "any":
        fields["block_ids"] = draw(st.lists(ints(), max_size=20))
    elif ids == "short":  # fewer or more than the range needs
        fields["block_ids"] = rng.integers(0, max(top, 1), int(rng.integers(0, n + 3))).tolist()
    else:  # in range, or a few just outside it
        lo, hi = (0, max(top, 1)) if ids == "fit" else (-3, top + 3)
        fields["block_ids"] = rng.integers(lo, hi, n).tolist()
    return sane, fields


def _without_blocks(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if k != "block_ids"}


@st.composite
def registrations(draw: st.DrawFn, corpus: Corpus) -> RegisterKV:
    """Engines of the real engine's identity (kv_spec "" too) with its layout or another,
    over its segment or as worker copies; and anything else."""
    sane = draw(st.booleans())
    memory = draw(  # the real engine's memory, another engine's, the L1 pool, or none
        st.sampled_from(
            [
                ShmMemory(segments=[corpus.segment], tokens=[corpus.seal]),
                ShmMemory(segments=[corpus.foreign], tokens=[corpus.foreign_seal]),
                ShmMemory(segments=[corpus.pool], tokens=[corpus.pool_seal]),
                WorkerCopy(),
                WorkerCopy(),
            ]
        )
    )
    layout = draw(
        st.one_of(
            st.just(corpus.layout),
            st.sampled_from(other_layouts(corpus.layout)),
            huge_layouts(corpus.layout),
        )
    )
    return RegisterKV(
        id=draw(MESSAGE_IDS),
        instance_id=draw(FUZZ_ENGINE_IDS if sane else ints().filter(lambda i: i != ENGINE_ID)),
        model_name=_pick(draw, sane, "m", STRINGS),
        world_size=_pick(draw, sane, 1, ints()),
        rank=_pick(draw, sane, 0, ints()),
        dtype=_pick(draw, sane, "bfloat16", STRINGS),
        layout=_pick(draw, sane, layout, layouts(corpus.layout)),
        memory=_pick(draw, sane, memory, shm_memories(corpus)),
        kv_spec=_pick(draw, sane, "", STRINGS),
    )


@st.composite
def lookups(draw: st.DrawFn, corpus: Corpus) -> Lookup:
    sane = draw(st.booleans())
    return Lookup(
        id=draw(MESSAGE_IDS),
        request_id=draw(REQUEST_IDS),
        model_name=_pick(draw, sane, "m", STRINGS),
        world_size=_pick(draw, sane, 1, st.one_of(st.sampled_from([2, 4096]), ints())),
        dtype=_pick(draw, sane, "bfloat16", STRINGS),
        tokens=_pick(draw, sane, draw(st.sampled_from(corpus.tokens)), token_bytes(corpus)),
        kv_spec=_pick(draw, sane, "", STRINGS),
        cache_salt=_pick(draw, sane, "", STRINGS),
    )


@st.composite
def commits(draw: st.DrawFn, corpus: Corpus) -> Commit:
    """Commits of transfers the fuzzers prepared (by their engine or another) or of any id."""
    known = draw(st.booleans())
    index = draw(st.integers(0, 2**16))
    engine: Any = draw(st.one_of(st.just("owner"), st.just(ENGINE_ID), FUZZ_ENGINE_IDS, ints()))
    transfer_id = draw(st.one_of(st.integers(0, 80), ints()))
    open_transfers = sorted(corpus.transfers.items())  # the state: used, never drawn from
    owner = None
    if known and open_transfers:
        transfer_id, owner = open_transfers[index % len(open_transfers)]
    return Commit(
        id=draw(MESSAGE_IDS),
        instance_id=(owner or ENGINE_ID) if engine == "owner" else engine,
        transfer_id=transfer_id,
        success=draw(st.booleans()),
    )


SEEDS = st.integers(0, 255)


@st.composite
def stray_frames(draw: st.DrawFn) -> tuple[tuple[int, int], ...]:
    """Now and then (one time in 8: not the 0 that hypothesis favours), data frames for a
    request that takes none."""
    if draw(st.integers(0, 7)) != 5:
        return ()
    sizes = st.sampled_from([0, 1, 64, REAL_CHUNK_BYTES])
    return tuple(draw(st.lists(st.tuples(sizes, SEEDS), min_size=1, max_size=3)))


@st.composite
def store_bytes_calls(draw: st.DrawFn, corpus: Corpus) -> Call:
    """A StoreBytes and its data frames: mostly one frame a chunk of the engine's chunk size,
    or any number of frames of any size."""
    sane, fields = draw(range_fields(corpus))
    req = StoreBytes(**_without_blocks(fields))
    span = req.end - req.start
    chunks = span // CHUNK if 0 <= span <= 6 * CHUNK else draw(st.integers(0, 3))
    count = _pick(draw, sane, chunks, st.integers(0, 6))
    sizes = st.sampled_from(sorted(FRAME_SIZES))
    frames = [(_pick(draw, sane, "right", sizes), draw(SEEDS)) for _ in range(count)]
    right = corpus.chunk_bytes(req.instance_id) or REAL_CHUNK_BYTES  # the state: not drawn
    if right > MAX_FUZZ_FRAME:
        right = REAL_CHUNK_BYTES
    return Call(req, tuple((FRAME_SIZES[size](right), seed) for size, seed in frames))


# A data frame's size, given the size of the engine's chunks.
FRAME_SIZES: dict[str, Callable[[int], int]] = {
    "right": lambda right: right,
    "empty": lambda right: 0,
    "one": lambda right: 1,
    "short": lambda right: right - 1,
    "long": lambda right: right + 1,
    "double": lambda right: 2 * right,
    "real": lambda right: REAL_CHUNK_BYTES,
    "1k": lambda right: 1024,
}


@functools.cache
def requests(corpus: Corpus, kind: type) -> st.SearchStrategy[Call]:
    """Structurally valid requests of ``kind`` with hostile field values (and data frames)."""
    if kind is StoreBytes:
        return store_bytes_calls(corpus)
    not_engine = st.one_of(FUZZ_ENGINE_IDS, ints().filter(lambda i: i != ENGINE_ID))
    ranges = range_fields(corpus).map(lambda sane_fields: sane_fields[1])
    strategies: dict[type[Any], st.SearchStrategy[Any]] = {
        Ping: st.builds(
            Ping, id=MESSAGE_IDS, instance_id=st.one_of(st.none(), st.just(ENGINE_ID), ints())
        ),
        RegisterKV: registrations(corpus),
        UnregisterKV: st.builds(UnregisterKV, id=MESSAGE_IDS, instance_id=not_engine),
        Lookup: lookups(corpus),
        QueryLookup: st.builds(QueryLookup, id=MESSAGE_IDS, request_id=REQUEST_IDS),
        FreeLookup: st.builds(
            FreeLookup,
            id=MESSAGE_IDS,
            request_id=REQUEST_IDS,
            start=st.one_of(st.sampled_from([0, CHUNK]), ints()),
            end=st.one_of(st.none(), ints()),
        ),
        Store: ranges.map(lambda f: Store(**f)),
        Retrieve: st.builds(
            lambda f, skip: Retrieve(**f, skip_tokens=skip),
            ranges,
            st.one_of(st.sampled_from([0, BLOCK, 3 * BLOCK]), st.sampled_from([CHUNK, -1]), ints()),
        ),
        PrepareStore: ranges.map(lambda f: PrepareStore(**_without_blocks(f))),
        PrepareRetrieve: ranges.map(lambda f: PrepareRetrieve(**_without_blocks(f))),
        Commit: commits(corpus),
        RetrieveBytes: ranges.map(lambda f: RetrieveBytes(**_without_blocks(f))),
        EndSession: st.builds(EndSession, id=MESSAGE_IDS, request_id=REQUEST_IDS),
    }
    return st.builds(Call, strategies[kind], stray_frames())
