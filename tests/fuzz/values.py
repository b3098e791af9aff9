"""Hostile values for the fuzzers to put in requests, and their hypothesis settings: ints
up to 2**64-1 with the edges that matter drawn often, strings, segment names, token arrays,
layouts (other valid ones over the real segment, huge ones, broken ones) and segment lists
with their seals, drawn mostly from the corpus's real values."""

from __future__ import annotations

import os

import msgspec
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from lmcache.protocol.messages import KVLayout, LayerPlacement, ShmMemory

from ..conftest import BLOCK, CHUNK
from .corpus import Corpus
from .wire import COUNT_MAX, INT64_MAX, INT64_MIN, SIZE_MAX, TOKENS_MAX, UINT64_MAX


def fuzz(max_examples: int) -> settings:
    """Moderate counts (the module runs in well under a minute); LMCACHE_FUZZ_SCALE=20
    digs deeper."""
    return settings(
        max_examples=max(1, round(max_examples * float(os.environ.get("LMCACHE_FUZZ_SCALE", "1")))),
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


def ints(lo: int = INT64_MIN, hi: int = UINT64_MAX) -> st.SearchStrategy[int]:
    """Any int msgpack can carry, with the edges that matter here drawn often."""
    edges = [
        0, 1, -1, 2, 3, BLOCK - 1, BLOCK, BLOCK + 1, 63, 64, 65, CHUNK - 1, CHUNK, CHUNK + 1,
        2 * CHUNK, 3 * CHUNK, 4 * CHUNK, -CHUNK, 4096, 4097, 2**24, 2**24 + 2, 2**32,
        COUNT_MAX, COUNT_MAX + 1, TOKENS_MAX, TOKENS_MAX + 1, SIZE_MAX, SIZE_MAX + 1,
        INT64_MAX, INT64_MAX + 1, UINT64_MAX, INT64_MIN,
    ]  # fmt: skip
    return st.one_of(st.sampled_from([e for e in edges if lo <= e <= hi]), st.integers(lo, hi))


STRINGS = st.one_of(
    st.text(max_size=24),
    st.sampled_from(
        [
            "", " ", "\x00", "m", "bfloat16", "../../etc/passwd", "/nonexistent", "/", ".",
            "..", "\n\r\t", "%s%d%n", "{}", "é" * 300, "x" * 257, "x" * 513, "y" * 20_000,
        ]
    ),
)  # fmt: skip
MESSAGE_IDS = st.one_of(st.integers(0, 1000), ints())
REQUEST_IDS = st.one_of(st.sampled_from(["fuzz-a", "fuzz-b", "fuzz-c"]), STRINGS)
SEGMENT_NAMES = st.one_of(
    st.sampled_from(
        [
            "", "/", ".", "..", "/..", "../../etc/passwd", "/nonexistent", "nonexistent",
            "/dev/shm/x", "a/b", "\x00", "/proc/self/mem", "a" * 200, "a" * 201, "/" + "a" * 200,
            "z" * 5000, "lmcache_kv_does_not_exist",
        ]
    ),
    st.text(max_size=20),
)  # fmt: skip


def token_bytes(corpus: Corpus) -> st.SearchStrategy[bytes]:
    real = st.sampled_from(corpus.tokens)
    return st.one_of(
        real,
        st.binary(max_size=64),
        st.tuples(real, st.binary(min_size=1, max_size=3)).map(lambda t: t[0] + t[1]),
        st.tuples(real, st.integers(0, 4 * (3 * CHUNK + 5))).map(lambda t: t[0][: t[1]]),
    )


def other_layouts(good: KVLayout) -> list[KVLayout]:
    """Valid layouts over the real engine's segment whose chunks differ from its own: an
    engine registered with one of them (and the same identity) shares the real engine's
    chunk keys, but not its chunk layout."""
    r = msgspec.structs.replace
    return [
        r(good, block_bytes=1024, block_stride=512, plane_stride=64 * 512),  # half the bytes
        r(good, planes=1, block_stride=2048, plane_stride=0),  # one plane of 2048
        r(good, num_layers=2, layers=good.layers[:2]),  # fewer layers
        r(good, block_size=2 * BLOCK),  # bigger blocks: fewer a chunk
        r(good, num_blocks=32),  # same chunks, fewer blocks
    ]


def huge_layouts(good: KVLayout) -> st.SearchStrategy[KVLayout]:
    """Chunks around the size of the L1 pool and far beyond (for a worker copy, nothing
    else bounds them): one chunk of 1 layer x 16 blocks x 2**24 bytes fills the pool."""
    return st.builds(
        lambda layers, block_bytes: msgspec.structs.replace(
            good, num_layers=layers, block_bytes=block_bytes
        ),
        st.sampled_from([1, 2, 4, 2**20, COUNT_MAX]),
        st.sampled_from([2**22, 2**24 - 2, 2**24, 2**24 + 2, 2**32, 2**40, SIZE_MAX]),
    )


def layouts(good: KVLayout) -> st.SearchStrategy[KVLayout]:
    small = st.one_of(st.integers(-2, 70), ints())
    placements = st.lists(
        st.builds(
            LayerPlacement,
            segment=st.one_of(st.integers(-1, 2), ints()),
            offset=st.one_of(st.sampled_from([0, 1, 2048 * 64, 2048 * 64 * 3]), ints()),
        ),
        max_size=6,
    )
    random_layout = st.builds(
        KVLayout,
        num_layers=small,
        num_blocks=small,
        block_size=st.one_of(st.sampled_from([BLOCK, 0, -BLOCK, 1, 3, CHUNK, 2 * CHUNK]), ints()),
        block_bytes=st.one_of(st.sampled_from([2048, 1024, 1, 3]), small),
        block_stride=st.one_of(st.sampled_from([1024, 2048, 1]), small),
        layers=placements,
        planes=st.one_of(st.sampled_from([1, 2]), small),
        plane_stride=st.one_of(st.sampled_from([0, 64 * 1024]), small),
    )
    numeric = [f for f in KVLayout.__struct_fields__ if f != "layers"]
    one_field_off = st.builds(
        lambda name, value: msgspec.structs.replace(good, **{name: value}),
        st.sampled_from(numeric),
        small,
    )
    other_layers = placements.map(lambda layers: msgspec.structs.replace(good, layers=layers))
    return st.one_of(
        st.just(good),
        st.sampled_from(other_layouts(good)),
        one_field_off,
        other_layers,
        random_layout,
        huge_layouts(good),
    )


def shm_memories(corpus: Corpus) -> st.SearchStrategy[ShmMemory]:
    """Segment names with seals: real segments with their own, another's or no seal, names
    that are no segment (see `Corpus`) or none at all, and lists of unequal lengths."""
    names = st.one_of(
        st.sampled_from(
            [
                corpus.segment, corpus.pool, corpus.foreign, corpus.unsealed, corpus.link,
                corpus.directory, corpus.fifo, corpus.segment.lstrip("/"), corpus.segment + "/",
            ]
        ),
        SEGMENT_NAMES,
    )  # fmt: skip
    seal = corpus.seal
    seals = st.one_of(
        st.sampled_from(
            [
                seal, corpus.pool_seal, corpus.foreign_seal, seal.upper(), seal[:-2],
                seal + "00", "", "0", "zz", "00" * 16, "00" * 8,
            ]
        ),
        st.binary(min_size=16, max_size=16).map(bytes.hex),
        STRINGS,
    )  # fmt: skip
    paired = st.lists(st.tuples(names, seals), max_size=4).map(
        lambda pairs: ShmMemory(segments=[n for n, _ in pairs], tokens=[t for _, t in pairs])
    )
    unpaired = st.builds(
        ShmMemory, segments=st.lists(names, max_size=4), tokens=st.lists(seals, max_size=4)
    )
    return st.one_of(paired, unpaired)
