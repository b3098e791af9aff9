"""The chaos test (tests/chaos.py) in its short form: one run of about a minute, whose
result each test below judges from one side. The long form runs the same script:

    .venv/bin/python -m tests.chaos --duration 600 --engines 6
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .chaos import SETTLED, ChaosConfig, ChaosResult, run

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def chaos() -> Iterator[ChaosResult]:
    result = run(ChaosConfig(duration=50, engines=4))
    print(result.to_json())  # shown with -s, and in the report of a failing test
    yield result


def test_the_chaos_happened(chaos: ChaosResult) -> None:
    kills = chaos.kills
    assert sum(kills.values()) >= 8, kills
    assert kills.get("store", 0) + kills.get("store_copy", 0) > 0, kills
    assert kills.get("retrieve", 0) + kills.get("retrieve_copy", 0) > 0, kills
    assert sum(chaos.shrinks.values()) >= 3, chaos.shrinks  # truncated segments (SIGBUS)
    assert chaos.clears >= 5 and chaos.clear_failures == 0
    assert chaos.fuzz["ipc_sent"] > 100 and chaos.fuzz["tcp_sent"] > 50, chaos.fuzz
    assert chaos.final_status["l1_evictions"] > 0  # L1 is small: stores evict
    for mode in ("engine_driven", "lmcache_driven", "bytes"):
        assert chaos.operations[f"{mode}.retrieve"].get("ok", 0) > 20, chaos.operations
        assert chaos.operations[f"{mode}.store"].get("ok", 0) > 20, chaos.operations


def test_every_retrieved_byte_is_right(chaos: ChaosResult) -> None:
    assert chaos.verified_chunks > 500
    assert chaos.wrong_bytes == 0, chaos.mismatch_reports
    assert chaos.skip_overwrites == 0, chaos.mismatch_reports


def test_no_crash_and_no_unexpected_error(chaos: ChaosResult) -> None:
    assert not chaos.engine_crashes, "\n".join(chaos.engine_crashes)
    assert chaos.unexpected_errors() == 0, chaos.operations
    assert chaos.server_alive and chaos.healthcheck == 200
    assert chaos.server_tracebacks == 0, f"see {chaos.server_log}"
    assert chaos.server_exit_code == 0


def test_every_fuzzed_frame_is_answered(chaos: ChaosResult) -> None:
    assert chaos.fuzz["ipc_no_reply"] == 0 and chaos.fuzz["tcp_no_reply"] == 0, chaos.fuzz


def test_locks_sessions_transfers_and_engines_go_back_to_zero(chaos: ChaosResult) -> None:
    assert chaos.settled_after_s is not None, {k: chaos.final_status[k] for k in SETTLED}


def test_no_segment_outlives_its_engine(chaos: ChaosResult) -> None:
    assert not chaos.server_leftovers, "the stopped server left files in its shm dir"
    assert chaos.leaked_segments == 0, (
        f"SERVER GAP: the KV segments of {chaos.leaked_segments} SIGKILLed engines stayed in "
        f"/dev/shm ({chaos.leaked_segment_names[:5]}...): the server unregisters a dead engine "
        "and unmaps its memory, but unlinks stale segments only when it starts"
    )
