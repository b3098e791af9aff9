"""Hybrid models' KV cache groups as logic: vLLM's groups, per-group identities, the
blocks a sliding-window group still holds, and the scheduler's per-group plans (fakes of
vLLM's types and of the server link, from test_connector_scheduler)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from lmcache.integration.vllm.kv_groups import (
    KVGroup,
    group_identity,
    held_load,
    held_store,
    kv_groups,
    primary_group,
)
from lmcache.integration.vllm.scheduler import SchedulerSide

from .test_connector_scheduler import BS, IDENT, C, FakeClient, FakeLink, request

SlidingWindowSpec = type("SlidingWindowSpec", (), {"sliding_window": 512})
FullAttentionSpec = type("FullAttentionSpec", (), {"sliding_window": 512})  # recorded only


def vllm_config() -> Any:
    return SimpleNamespace(
        kv_cache_groups=[
            SimpleNamespace(layer_names=["l.0", "l.2"], kv_cache_spec=SlidingWindowSpec()),
            SimpleNamespace(layer_names=["l.1", "l.3"], kv_cache_spec=FullAttentionSpec()),
        ]
    )


def test_groups_their_windows_and_the_primary() -> None:
    groups = kv_groups(vllm_config())
    assert groups == [KVGroup(0, ("l.0", "l.2"), 512), KVGroup(1, ("l.1", "l.3"), None)]
    assert primary_group(groups) == 1  # lookups ask the group that holds every block
    assert kv_groups(None) == []


def test_each_group_has_its_own_keys_and_one_group_keeps_the_old_ones() -> None:
    groups = kv_groups(vllm_config())
    specs = [group_identity(IDENT, g, 2).kv_spec for g in groups]
    assert specs == ["spec;group=0/2;window=512", "spec;group=1/2"]
    assert group_identity(IDENT, groups[1], 1) is IDENT


def test_a_window_group_stores_from_the_first_chunk_it_still_holds() -> None:
    # blocks of 128 tokens, chunks of 256: 0 is vLLM's null block (left the window)
    assert held_store(0, 1024, [5, 6, 7, 8, 9, 10, 11, 12], BS, C) == (
        0,
        [5, 6, 7, 8, 9, 10, 11, 12],
    )
    assert held_store(0, 1024, [0, 0, 0, 8, 9, 10, 11, 12], BS, C) == (512, [9, 10, 11, 12])
    assert held_store(0, 1024, [0, 0, 7, 8, 9, 10, 11, 12], BS, C) == (256, [7, 8, 9, 10, 11, 12])
    assert held_store(256, 640, [0, 0, 0], BS, C) is None


def test_a_window_group_loads_only_the_blocks_it_holds() -> None:
    ids = [0, 0, 0, 8, 9, 10]
    # from the chunk of the first held block, skipping the null one before it
    assert held_load(0, 768, ids, 0, bs=BS, chunk=C) == (256, [0, 8, 9, 10], 128)
    assert held_load(0, 768, ids, 640, bs=BS, chunk=C) == (512, [9, 10], 128)  # vLLM's hit
    assert held_load(0, 768, [0] * 6, 0, bs=BS, chunk=C) is None


def test_the_scheduler_plans_loads_and_stores_per_group() -> None:
    client = FakeClient(hit=1024)
    s = SchedulerSide(
        FakeLink(client),  # type: ignore[arg-type]
        IDENT, can_load=True, can_store=True, primary=1, window_groups={0: 512},
        async_loads=True,
    )  # fmt: skip
    req = request("a", 1100)
    assert s.get_num_new_matched_tokens(req, 0) == (1024, True)  # vLLM waits for it
    assert [name for name, _ in client.calls] == ["lookup"]  # one lookup, the primary's
    window, full = [0, 0, 0, 0, 0, 14, 15, 16], [21, 22, 23, 24, 25, 26, 27, 28]
    s.update_state_after_alloc(req, SimpleNamespace(get_block_ids=lambda: (window, full)), 1024)
    loads = s.build_connector_meta(SimpleNamespace(
        preempted_req_ids=None, scheduled_new_reqs=[], num_scheduled_tokens={},
        scheduled_cached_reqs=SimpleNamespace(
            req_ids=[], new_block_ids=[], num_computed_tokens=[], resumed_req_ids=set()),
    )).loads  # fmt: skip
    got = sorted((x.group, x.start, x.end, x.skip_tokens, x.block_ids) for x in loads)
    assert got == [(0, 512, 1024, 128, [0, 14, 15, 16]), (1, 0, 1024, 0, full)]
    # a new request (a miss) stores per group; the window group what it still holds
    client.hit = 0
    b = request("b", 1024)
    s.get_num_new_matched_tokens(b, 0)
    meta = s.build_connector_meta(SimpleNamespace(
        preempted_req_ids=None, num_scheduled_tokens={"b": 1024},
        scheduled_new_reqs=[SimpleNamespace(req_id="b", block_ids=(window, full),
                                            num_computed_tokens=0)],
        scheduled_cached_reqs=SimpleNamespace(
            req_ids=[], new_block_ids=[], num_computed_tokens=[], resumed_req_ids=set()),
    ))  # fmt: skip
    stored = sorted((x.group, x.start, x.end, x.block_ids) for x in meta.stores)
    assert stored == [(0, 768, 1024, [15, 16]), (1, 0, 1024, full)]


def test_a_hybrid_model_with_state_groups_is_refused() -> None:
    import pytest

    MambaSpec = type("MambaSpec", (), {})
    config = vllm_config()
    config.kv_cache_groups.append(SimpleNamespace(layer_names=["m.4"], kv_cache_spec=MambaSpec()))
    with pytest.raises(NotImplementedError, match="group 2 is a MambaSpec"):
        kv_groups(config)
    alone = SimpleNamespace(kv_cache_groups=config.kv_cache_groups[2:])
    assert kv_groups(alone) == [KVGroup(0, ("m.4",), None)]  # one group: as before


def test_a_window_group_never_stores_blocks_that_left_its_window() -> None:
    """A chunked prefill of 900 tokens in steps of 767 and 133 under a 128-token window:
    when vLLM schedules the second step it frees the window group's blocks before token
    767 - 128 + 1 = 640 (blocks 0..4; our copy of the table still names them), so the
    tail's store of that group starts past them (the full group's does not)."""
    client = FakeClient(hit=0)
    s = SchedulerSide(
        FakeLink(client),  # type: ignore[arg-type]
        IDENT, can_load=True, can_store=True, primary=1, window_groups={0: 128},
    )  # fmt: skip
    req = request("c", 900)
    s.get_num_new_matched_tokens(req, 0)
    window, full = list(range(11, 19)), list(range(21, 29))
    empty = SimpleNamespace(
        req_ids=[], new_block_ids=[], num_computed_tokens=[], resumed_req_ids=set()
    )
    first = s.build_connector_meta(SimpleNamespace(
        preempted_req_ids=None, num_scheduled_tokens={"c": 767}, scheduled_cached_reqs=empty,
        scheduled_new_reqs=[SimpleNamespace(req_id="c", block_ids=(window[:6], full[:6]),
                                            num_computed_tokens=0)],
    ))  # fmt: skip
    got = sorted((x.group, x.start, x.end, x.block_ids) for x in first.stores)
    assert got == [(0, 0, 512, window[:4]), (1, 0, 512, full[:4])]
    second = s.build_connector_meta(SimpleNamespace(
        preempted_req_ids=None, num_scheduled_tokens={"c": 133}, scheduled_new_reqs=[],
        scheduled_cached_reqs=SimpleNamespace(
            req_ids=["c"], new_block_ids=[(window[6:], full[6:])], num_computed_tokens=[767],
            resumed_req_ids=set()),
    ))  # fmt: skip
    got = sorted((x.group, x.start, x.end, x.block_ids) for x in second.stores)
    assert got == [(0, 768, 896, [17]), (1, 512, 896, [25, 26, 27])]


def test_a_failed_asynchronous_load_is_computed_and_stored_again() -> None:
    """vLLM resets a request whose asynchronous load failed and asks again: no second
    lookup or load, and its stores cover the prompt again (a group's chunks may be what
    was missing)."""
    client = FakeClient(hit=512)
    s = SchedulerSide(
        FakeLink(client),  # type: ignore[arg-type]
        IDENT, can_load=True, can_store=True, primary=1, window_groups={0: 512},
        async_loads=True,
    )  # fmt: skip
    req = request("f", 600)
    assert s.get_num_new_matched_tokens(req, 0) == (512, True)
    ids = ([31, 32, 33, 34, 35], [41, 42, 43, 44, 45])
    s.update_state_after_alloc(req, SimpleNamespace(get_block_ids=lambda: ids), 512)
    empty = SimpleNamespace(
        req_ids=[], new_block_ids=[], num_computed_tokens=[], resumed_req_ids=set()
    )
    assert len(s.build_connector_meta(SimpleNamespace(
        preempted_req_ids=None, num_scheduled_tokens={}, scheduled_new_reqs=[],
        scheduled_cached_reqs=empty,
    )).loads) == 2  # fmt: skip
    assert s.get_num_new_matched_tokens(req, 0) == (0, False)  # the load failed
    meta = s.build_connector_meta(SimpleNamespace(
        preempted_req_ids=None, num_scheduled_tokens={"f": 600}, scheduled_cached_reqs=empty,
        scheduled_new_reqs=[SimpleNamespace(req_id="f", block_ids=ids, num_computed_tokens=0)],
    ))  # fmt: skip
    assert sorted((x.group, x.start, x.end) for x in meta.stores) == [(0, 0, 512), (1, 0, 512)]
    assert [name for name, _ in client.calls] == ["lookup"]
