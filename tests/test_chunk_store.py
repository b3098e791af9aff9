"""The storage entry point (`ChunkStore`) and the one owner of keys (`KeySpace`), as units."""

from __future__ import annotations

import numpy as np
import pytest

from lmcache.errors import BadRequestError, CacheMissError, TransferError
from lmcache.storage import keyspace as keyspace_module
from lmcache.storage.chunk_store import ChunkLayout, ChunkStore, Fill
from lmcache.storage.eviction import make_policy
from lmcache.storage.keys import ChunkHasher, Namespace
from lmcache.storage.keyspace import KeySpace, l2_key
from lmcache.storage.l1 import L1Cache
from lmcache.types import ObjectKey

PAGE = 4096
LAYOUT = ChunkLayout(b"layout-a", PAGE)


def key(i: int) -> ObjectKey:
    return ObjectKey(i.to_bytes(48, "big"))


def make_store(pages: int = 4) -> tuple[ChunkStore, list[tuple[ObjectKey, bytes]]]:
    stored: list[tuple[ObjectKey, bytes]] = []
    l1 = L1Cache(np.zeros(pages * PAGE, dtype=np.uint8), make_policy("LRU"))
    return ChunkStore(l1, on_stored=lambda k, tag: stored.append((k, tag))), stored


def fill_with(value: int) -> Fill:
    def fill(i: int, dst: np.ndarray) -> None:
        dst[:] = value + i

    return fill


def test_write_counts_each_chunk_and_tells_the_hook() -> None:
    store, stored = make_store()
    result = store.write([key(1), key(2)], LAYOUT, fill_with(10))
    assert (result.stored, result.cached, result.conflicts, result.no_space) == (2, 0, 0, False)
    assert stored == [(key(1), b"layout-a"), (key(2), b"layout-a")]
    other = ChunkLayout(b"layout-b", PAGE)
    again = store.write([key(1), key(3)], other, fill_with(20))
    assert (again.stored, again.conflicts) == (1, 1)  # key 1 is there with another layout
    with store.read([key(1), key(2)], b"layout-a", "reader") as views:
        assert [int(v[0]) for v in views] == [10, 11]


def test_a_full_store_stops_and_says_so() -> None:
    store, _ = make_store(pages=2)
    lease = None
    store.write([key(1), key(2)], LAYOUT, fill_with(0))
    lease = store.pin([key(1), key(2)], LAYOUT.tag, "holder")  # nothing can be evicted
    result = store.write([key(3), key(4)], LAYOUT, fill_with(0))
    assert result.no_space and result.stored == 0
    assert lease is not None and store.unpin(lease)


def test_a_failing_fill_aborts_and_a_refusing_fill_stops() -> None:
    store, stored = make_store()

    def boom(i: int, dst: np.ndarray) -> None:
        raise RuntimeError("source vanished")

    with pytest.raises(RuntimeError):
        store.write([key(1)], LAYOUT, boom)
    result = store.write([key(1), key(2)], LAYOUT, lambda i, dst: i != 0)
    assert result.unfilled and result.stored == 0
    assert store.l1.stats()["objects"] == 0 and stored == []  # nothing left half-written
    quiet = store.write([key(5)], LAYOUT, fill_with(1), notify=False)
    assert quiet.stored == 1 and stored == []  # from L2: not offered back to L2


def test_reserve_then_commit_or_abort() -> None:
    store, stored = make_store()
    store.write([key(1)], LAYOUT, fill_with(0))
    res = store.reserve([key(1), key(2), key(3)], LAYOUT, ttl=30)
    assert res.offsets[0] == -1 and len(res.slots) == 2 and not res.no_space
    assert store.commit(res.slots[:1], LAYOUT.tag) == 1
    store.abort(res.slots[1:])
    assert [k for k, _ in stored] == [key(1), key(2)]
    with pytest.raises(CacheMissError, match="the range"), store.read([key(3)], LAYOUT.tag, "r"):
        pass


def test_a_clear_during_a_read_is_an_error_not_data() -> None:
    store, _ = make_store()
    store.write([key(1)], LAYOUT, fill_with(0))
    with pytest.raises(TransferError, match="cleared"), store.read([key(1)], LAYOUT.tag, "r"):
        store.clear()
    assert store.l1.stats()["locked"] == 0


# ----- keys ---------------------------------------------------------------------------------


def tokens(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 50_000, n, dtype="<u4").tobytes()


def test_lookups_stores_and_l2_derive_the_same_keys() -> None:
    keys = KeySpace(ChunkHasher(4))
    prompt = tokens(4 * 5 + 2)  # 5 whole chunks and a tail
    digests = keys.rank_digests("m", 2, "bf16", "spec", "salt")
    groups = keys.prompt_keys(digests, prompt)
    assert len(groups) == 5
    for rank in range(2):
        ns = Namespace("m", 2, rank, "bf16", "spec", "salt")
        assert keys.digest(ns) == digests[rank] == ns.digest
        assert keys.range_keys(digests[rank], prompt, 8, 20) == [g[rank] for g in groups[2:5]]
    assert l2_key(groups[0][0], b"a") != l2_key(groups[0][0], b"b")
    assert l2_key(groups[0][0], b"a")[16:] == groups[0][0][16:]


def test_bad_ranges_are_bad_requests() -> None:
    keys = KeySpace(ChunkHasher(4))
    d = keys.digest(Namespace("m", 1, 0, "bf16", ""))
    for start, end, n in ((1, 4, 8), (4, 0, 8), (0, 12, 8)):
        with pytest.raises(BadRequestError):
            keys.range_keys(d, tokens(n), start, end)
    with pytest.raises(BadRequestError, match="multiple of 4 bytes"):
        keys.prompt_keys([d], b"abc")


def test_the_digest_memo_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keyspace_module, "MAX_MEMO_DIGESTS", 10)
    keys = KeySpace(ChunkHasher(4))
    for salt in range(50):
        keys.digest(Namespace("m", 1, 0, "bf16", "", str(salt)))
        keys.rank_digests("m", 3, "bf16", "", str(salt))
    assert len(keys._digests) + 3 * len(keys._rank_digests) <= 10
