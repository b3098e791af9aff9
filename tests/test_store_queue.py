"""`StoreQueue`: the worker's stores off the step (no server, no vLLM)."""

from __future__ import annotations

import threading
import time

import pytest

from lmcache.integration.vllm.metadata import StoreSpec
from lmcache.integration.vllm.store_queue import StoreQueue


def spec(rid: str, start: int = 0) -> StoreSpec:
    return StoreSpec(request_id=rid, tokens=[], start=start, end=start + 1, block_ids=[])


def test_stores_run_in_order_off_the_caller_thread() -> None:
    ran: list[tuple[str, int, str]] = []
    q = StoreQueue(lambda s: ran.append((s.request_id, s.start, threading.current_thread().name)))
    q.submit([spec("a", 0), spec("b", 0), spec("a", 1)])
    assert q.wait(10)
    assert [(r, s) for r, s, _ in ran] == [("a", 0), ("b", 0), ("a", 1)]
    assert {t for *_, t in ran} == {"lmcache-store"}
    q.close()


def test_finished_requests_are_reported_once_their_stores_are_done() -> None:
    gate = threading.Event()

    def run(s: StoreSpec) -> None:
        gate.wait(10)

    q = StoreQueue(run)
    q.submit([spec("a"), spec("a", 1)])
    q.finish(["a", "b"])  # b stored nothing (or its stores ended long ago)
    assert q.done() == {"b"}
    assert q.in_flight == 2
    gate.set()
    assert q.wait(10) and q.in_flight == 0
    assert q.done() == {"a"}
    assert q.done() == set()
    q.close()


def test_a_failing_store_is_logged_and_the_thread_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ran: list[str] = []

    def run(s: StoreSpec) -> None:
        if s.request_id == "bad":
            raise RuntimeError("boom")
        ran.append(s.request_id)

    q = StoreQueue(run)
    q.submit([spec("bad"), spec("good")])
    q.finish(["bad"])
    assert q.wait(10)
    assert ran == ["good"] and q.done() == {"bad"}  # a failed store still ends
    assert "store of request bad failed" in caplog.text
    q.close()


def test_wait_times_out_and_close_runs_what_is_queued() -> None:
    gate, ran = threading.Event(), list[str]()

    def run(s: StoreSpec) -> None:
        gate.wait(10)
        ran.append(s.request_id)

    q = StoreQueue(run)
    q.submit([spec("a"), spec("b")])
    start = time.monotonic()
    assert q.wait(0.05) is False and time.monotonic() - start < 5
    threading.Timer(0.1, gate.set).start()
    q.close()
    assert ran == ["a", "b"]
    q.submit([spec("late")])  # after close: dropped, never blocks
    assert q.in_flight == 0


def test_bookkeeping_is_bounded_by_what_is_in_flight() -> None:
    q = StoreQueue(lambda s: None)
    q.submit([spec(f"r{i}") for i in range(1000)])
    assert q.wait(10)
    assert not q._pending  # requests whose stores ended leave nothing behind
    q.close()
