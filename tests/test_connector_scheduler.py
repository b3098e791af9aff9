"""Scheduler-side connector logic with a fake server link (no vLLM, no sockets)."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

from lmcache.errors import ServerUnavailableError
from lmcache.integration.vllm.identity import CacheIdentity
from lmcache.integration.vllm.scheduler import SchedulerSide

C, BS = 256, 128
IDENT = CacheIdentity("m", 1, "float32", "spec", BS)


@dataclass
class FakeClient:
    hit: int | None = 0
    pending_then: int | None = None
    fail: Exception | None = None
    calls: list[tuple[str, Any]] = field(default_factory=list)

    def lookup(self, request_id: str, tokens: list[int], **kw: Any) -> int | None:
        self.calls.append(("lookup", (request_id, len(tokens))))
        if self.fail:
            raise self.fail
        return self.hit

    def query_lookup(self, request_id: str) -> int | None:
        self.calls.append(("query", request_id))
        return self.pending_then

    def free_lookup(self, request_id: str, start: int = 0, end: int | None = None) -> None:
        self.calls.append(("free", (request_id, start, end)))

    def end_session(self, request_id: str) -> None:
        self.calls.append(("end", request_id))


@dataclass
class FakeLink:
    client: FakeClient
    chunk_size: int = C
    healthy: bool = True
    downs: list[object] = field(default_factory=list)

    def start_heartbeat(self) -> None:
        pass

    def mark_down(self, reason: object) -> None:
        self.healthy = False
        self.downs.append(reason)


def side(
    client: FakeClient, *, can_load: bool = True, can_store: bool = True, async_store: bool = True
) -> tuple[SchedulerSide, FakeLink]:
    link = FakeLink(client)
    s = SchedulerSide(
        link,  # type: ignore[arg-type]
        IDENT, can_load=can_load, can_store=can_store, async_store=async_store,
    )  # fmt: skip
    return s, link


def request(rid: str, n: int, salt: str | None = None) -> Any:
    return SimpleNamespace(
        request_id=rid, prompt_token_ids=list(range(n)), cache_salt=salt, status=None
    )


def blocks(ids: list[int]) -> Any:
    return SimpleNamespace(get_block_ids=lambda: (ids,))


def step(
    new: list[tuple[str, list[int], int]],
    scheduled: dict[str, int],
    cached: Any = None,
    preempted: set[str] | None = None,
) -> Any:
    return SimpleNamespace(
        preempted_req_ids=preempted,
        scheduled_new_reqs=[
            SimpleNamespace(req_id=r, block_ids=(b,), num_computed_tokens=c) for r, b, c in new
        ],
        scheduled_cached_reqs=cached
        or SimpleNamespace(
            req_ids=[], new_block_ids=[], num_computed_tokens=[], resumed_req_ids=set()
        ),
        num_scheduled_tokens=scheduled,
    )


def test_full_prompt_hit_recomputes_the_last_token() -> None:
    s, _ = side(FakeClient(hit=512))
    req = request("a", 512)
    assert s.get_num_new_matched_tokens(req, 0) == (511, False)
    s.update_state_after_alloc(req, blocks([7, 3, 9, 4]), 511)
    load = s.build_connector_meta(step([], {})).loads[0]
    assert (load.start, load.end, load.skip_tokens, load.block_ids) == (0, 512, 0, [7, 3, 9, 4])
    assert s.build_connector_meta(step([], {})).loads == []  # shipped once


def test_vllm_prefix_hit_is_skipped_and_its_locks_freed() -> None:
    client = FakeClient(hit=768)
    s, _ = side(client)
    req = request("a", 1000)
    assert s.get_num_new_matched_tokens(req, 384) == (384, False)  # vLLM already has 384
    s.update_state_after_alloc(req, blocks(list(range(8))), 384)
    load = s.build_connector_meta(step([], {})).loads[0]
    assert (load.start, load.end, load.skip_tokens) == (256, 768, 128)
    assert load.block_ids == [2, 3, 4, 5]
    assert ("free", ("a", 0, 256)) in client.calls


def test_lookup_pending_then_answered_and_idempotent() -> None:
    client = FakeClient(hit=None, pending_then=256)
    s, _ = side(client)
    req = request("a", 600)
    assert s.get_num_new_matched_tokens(req, 0) == (None, False)
    assert s.get_num_new_matched_tokens(req, 0) == (256, False)
    assert s.get_num_new_matched_tokens(req, 0) == (256, False)
    assert [c[0] for c in client.calls] == ["lookup", "query"]
    assert client.calls[0][1] == ("a", 512)  # only whole blocks are looked up


def test_chunked_prefill_stores_each_whole_chunk_once() -> None:
    s, _ = side(FakeClient(hit=0))
    req = request("a", 1100)
    assert s.get_num_new_matched_tokens(req, 0) == (0, False)
    s.update_state_after_alloc(req, blocks([]), 0)
    meta = s.build_connector_meta(step([("a", list(range(8)), 0)], {"a": 600}))
    assert [(x.start, x.end, x.block_ids) for x in meta.stores] == [(0, 512, [0, 1, 2, 3])]
    cached = SimpleNamespace(
        req_ids=["a"], new_block_ids=[([8],)], num_computed_tokens=[600], resumed_req_ids=set()
    )
    meta = s.build_connector_meta(step([], {"a": 500}, cached))
    assert [(x.start, x.end, x.block_ids) for x in meta.stores] == [(512, 1024, [4, 5, 6, 7])]
    decode = SimpleNamespace(
        req_ids=["a"], new_block_ids=[None], num_computed_tokens=[1100], resumed_req_ids=set()
    )
    assert s.build_connector_meta(step([], {"a": 1}, decode)).stores == []  # tail: never


def test_hit_chunks_are_not_stored_again() -> None:
    s, _ = side(FakeClient(hit=512))
    req = request("a", 1100)
    s.get_num_new_matched_tokens(req, 0)
    s.update_state_after_alloc(req, blocks(list(range(9))), 512)
    s.build_connector_meta(step([], {}))
    meta = s.build_connector_meta(step([("a", list(range(9)), 512)], {"a": 588}))
    assert [(x.start, x.end) for x in meta.stores] == [(512, 1024)]


@pytest.mark.parametrize("role", ["kv_producer", "kv_consumer"])
def test_roles(role: str) -> None:
    client = FakeClient(hit=512)
    s, _ = side(client, can_load=role != "kv_producer", can_store=role != "kv_consumer")
    req = request("a", 600)
    got = s.get_num_new_matched_tokens(req, 0)
    s.update_state_after_alloc(req, blocks([0, 1, 2, 3, 4]), got[0] or 0)
    meta = s.build_connector_meta(step([("a", [0, 1, 2, 3, 4], 0)], {"a": 600}))
    if role == "kv_producer":
        assert got == (0, False) and not meta.loads and meta.stores
        assert not [c for c in client.calls if c[0] == "lookup"]
    else:
        assert got == (512, False) and meta.loads and not meta.stores


def test_server_down_means_misses_never_exceptions() -> None:
    client = FakeClient(fail=ServerUnavailableError("down"))
    s, link = side(client)
    assert s.get_num_new_matched_tokens(request("a", 600), 0) == (0, False)
    assert not link.healthy and link.downs
    assert s.get_num_new_matched_tokens(request("b", 600), 0) == (0, False)
    assert len([c for c in client.calls if c[0] == "lookup"]) == 1  # degraded: no more RPCs
    assert s.build_connector_meta(step([("b", [0, 1, 2, 3, 4], 0)], {"b": 600})).stores == []

    broken = FakeClient(fail=RuntimeError("bug"))
    s2, _ = side(broken)
    assert s2.get_num_new_matched_tokens(request("c", 600), 0) == (0, False)


def test_abort_before_scheduling_and_failed_load() -> None:
    client = FakeClient(hit=512)
    s, _ = side(client)
    s.request_finished(request("never-seen", 10))  # no tracker: nothing to do, no error
    req = request("a", 600)
    assert s.get_num_new_matched_tokens(req, 0) == (512, False)
    s.update_state_after_alloc(req, blocks([0, 1, 2, 3, 4]), 512)
    s.build_connector_meta(step([], {}))
    # vLLM asks again: the load failed and the request was reset. Compute it instead.
    assert s.get_num_new_matched_tokens(req, 0) == (0, False)
    s.request_finished(req)
    assert ("end", "a") in client.calls


def test_preempted_request_is_looked_up_again() -> None:
    client = FakeClient(hit=512)
    s, _ = side(client)
    req = request("a", 600)
    s.get_num_new_matched_tokens(req, 0)
    s.update_state_after_alloc(req, blocks([0, 1, 2, 3, 4]), 512)
    s.build_connector_meta(step([], {}))
    req.status = SimpleNamespace(name="PREEMPTED")
    assert s.get_num_new_matched_tokens(req, 0) == (512, False)
    assert len([c for c in client.calls if c[0] == "lookup"]) == 2


def test_salt_is_passed_to_lookups() -> None:
    seen: dict[str, Any] = {}
    client = FakeClient(hit=0)
    original = client.lookup

    def lookup(request_id: str, tokens: list[int], **kw: Any) -> int | None:
        seen.update(kw)
        return original(request_id, tokens, **kw)

    client.lookup = lookup  # type: ignore[method-assign]
    s, _ = side(client)
    s.get_num_new_matched_tokens(request("a", 600, salt="tenant-1"), 0)
    assert seen["cache_salt"] == "tenant-1" and seen["kv_spec"] == "spec"


def lookups(client: FakeClient) -> int:
    return len([c for c in client.calls if c[0] == "lookup"])


def test_vllm_prefix_cache_covering_every_whole_chunk_costs_no_server_call() -> None:
    """vLLM's own cache has all a lookup could add: no lookup, no store, no session to end
    (issue 12, co-operation with vLLM's prefix cache)."""
    client = FakeClient(hit=1024)
    s, _ = side(client)
    req = request("a", 1100)
    assert s.get_num_new_matched_tokens(req, 1024) == (0, False)
    s.update_state_after_alloc(req, blocks(list(range(9))), 0)
    meta = s.build_connector_meta(step([("a", list(range(9)), 1024)], {"a": 76}))
    assert meta.stores == [] and meta.loads == []
    assert s.request_finished(req) is False  # nothing stored: blocks freed at once
    assert client.calls == []
    # A prompt of exactly 4 chunks: vLLM keeps the last token's block to compute; its
    # 896 cached tokens leave chunk 3 to us, so this one is looked up.
    assert s.get_num_new_matched_tokens(request("b", 1024), 896) == (127, False)
    assert lookups(client) == 1


def test_a_partial_vllm_hit_loads_only_what_vllm_lacks() -> None:
    client = FakeClient(hit=1024)
    s, _ = side(client)
    req = request("a", 1100)
    assert s.get_num_new_matched_tokens(req, 640) == (384, False)
    s.update_state_after_alloc(req, blocks(list(range(9))), 384)
    load = s.build_connector_meta(step([], {})).loads[0]
    assert (load.start, load.end, load.skip_tokens) == (512, 1024, 128)
    assert load.block_ids == [4, 5, 6, 7]


def test_a_request_that_stored_keeps_its_blocks_until_the_workers_report() -> None:
    s, _ = side(FakeClient(hit=0))
    req = request("a", 600)
    s.get_num_new_matched_tokens(req, 0)
    s.update_state_after_alloc(req, blocks([]), 0)
    meta = s.build_connector_meta(step([("a", [0, 1, 2, 3, 4], 0)], {"a": 600}))
    assert meta.stores and meta.finished_stores == []
    assert s.request_finished(req) is True
    assert s.build_connector_meta(step([], {})).finished_stores == ["a"]  # shipped once
    assert s.build_connector_meta(step([], {})).finished_stores == []

    sync, _ = side(FakeClient(hit=0), async_store=False)
    sync.get_num_new_matched_tokens(req, 0)
    sync.build_connector_meta(step([("a", [0, 1, 2, 3, 4], 0)], {"a": 600}))
    assert sync.request_finished(req) is False  # stores ran inside the step


def test_preempted_requests_are_told_to_the_workers() -> None:
    s, _ = side(FakeClient(hit=0))
    assert s.build_connector_meta(step([], {}, preempted={"b", "a"})).preempted == ["a", "b"]
    assert s.build_connector_meta(step([], {})).preempted == []


# ----- finer tails: a prompt's whole blocks past its last whole chunk --------------------------


def test_lookups_send_whole_blocks_and_the_block_size() -> None:
    seen: dict[str, Any] = {}

    class Recording(FakeClient):
        def lookup(self, request_id: str, tokens: list[int], **kw: Any) -> int | None:
            seen.update(kw, n=len(tokens))
            return super().lookup(request_id, tokens, **kw)

    s, _ = side(Recording(hit=0))
    s.get_num_new_matched_tokens(request("a", 1200), 0)  # 4 chunks + 1 block + 48 tokens
    assert seen["n"] == 1152 and seen["block_size"] == BS


def test_a_partial_hit_is_loaded_to_its_last_block() -> None:
    s, _ = side(FakeClient(hit=1152))
    req = request("a", 1200)
    assert s.get_num_new_matched_tokens(req, 0) == (1152, False)
    s.update_state_after_alloc(req, blocks(list(range(10))), 1152)
    load = s.build_connector_meta(step([], {})).loads[0]
    assert (load.start, load.end, load.skip_tokens) == (0, 1152, 0)
    assert load.block_ids == list(range(9))
    # What was hit is not stored again, not even the partial chunk.
    meta = s.build_connector_meta(step([("a", list(range(10)), 1152)], {"a": 48}))
    assert meta.stores == []


def test_a_partial_hit_inside_what_vllm_has_skips_its_blocks() -> None:
    s, _ = side(FakeClient(hit=1024 + 3 * 128))
    req = request("a", 1500)
    assert s.get_num_new_matched_tokens(req, 1024 + 128) == (256, False)
    s.update_state_after_alloc(req, blocks(list(range(12))), 256)
    load = s.build_connector_meta(step([], {})).loads[0]
    assert (load.start, load.end, load.skip_tokens) == (1024, 1408, 128)
    assert load.block_ids == [8, 9, 10]


def test_the_tail_is_stored_once_the_prompt_is_computed() -> None:
    s, _ = side(FakeClient(hit=0))
    req = request("a", 1200)
    s.get_num_new_matched_tokens(req, 0)
    s.update_state_after_alloc(req, blocks([]), 0)
    # A chunked prefill: no partial chunk while the prompt is still being computed.
    meta = s.build_connector_meta(step([("a", list(range(5)), 0)], {"a": 600}))
    assert [(x.start, x.end) for x in meta.stores] == [(0, 512)]
    cached = SimpleNamespace(
        req_ids=["a"], new_block_ids=[(list(range(5, 10)),)], num_computed_tokens=[600],
        resumed_req_ids=set(),
    )  # fmt: skip
    meta = s.build_connector_meta(step([], {"a": 600}, cached))
    assert [(x.start, x.end, x.block_ids) for x in meta.stores] == [(512, 1152, [4, 5, 6, 7, 8])]
    decode = SimpleNamespace(
        req_ids=["a"], new_block_ids=[None], num_computed_tokens=[1200], resumed_req_ids=set()
    )
    assert s.build_connector_meta(step([], {"a": 1}, decode)).stores == []  # stored once


def test_a_shorter_partial_hit_stores_the_longer_tail() -> None:
    s, _ = side(FakeClient(hit=1024 + 128))
    req = request("a", 1500)  # its tail: 3 whole blocks
    s.get_num_new_matched_tokens(req, 0)
    s.update_state_after_alloc(req, blocks(list(range(12))), 1152)
    s.build_connector_meta(step([], {}))
    meta = s.build_connector_meta(step([("a", list(range(12)), 1152)], {"a": 348}))
    assert [(x.start, x.end, x.block_ids) for x in meta.stores] == [(1024, 1408, [8, 9, 10])]


def test_vllm_covering_every_whole_block_costs_no_server_call() -> None:
    client = FakeClient(hit=1152)
    s, _ = side(client)
    req = request("a", 1200)
    assert s.get_num_new_matched_tokens(req, 1152) == (0, False)
    s.update_state_after_alloc(req, blocks(list(range(10))), 0)
    meta = s.build_connector_meta(step([("a", list(range(10)), 1152)], {"a": 48}))
    assert meta.stores == [] and meta.loads == [] and client.calls == []
