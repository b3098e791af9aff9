"""The start-up banner (`lmcache.server.banner`) of a real server, and the progress lines
of long start-up steps (`lmcache.progress`): pre-faulting a pool, indexing an fs L2."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import pytest

from lmcache import defaults
from lmcache.progress import Progress
from lmcache.storage import shm
from lmcache.storage.l2.fs import FsL2
from lmcache.storage.shm import ShmSegment
from lmcache.types import ObjectKey

from .conftest import start_server

TOKEN = "s3cret-admin-token-0123456789abcdef"


def test_banner_says_what_an_operator_needs_once(tmp_path: Path) -> None:
    l2 = tmp_path / "l2"
    s = start_server(
        "--l1-size-gb", "0.25", "--l1-init-size-gb", "0.0625",
        "--eviction-trigger-watermark", "0.8",
        "--l2-adapter", json.dumps({"type": "fs", "path": str(l2)}),
        env={"LMCACHE_ADMIN_TOKEN": TOKEN},
    )  # fmt: skip
    try:
        status = s.status()
    finally:
        s.stop()
    log = s.log()
    lines = [line.removeprefix("LMCache INFO: ") for line in log.splitlines()]
    start = lines.index(f"---- lmcache {status['version']}, instance {status['instance_id']} ----")
    http = lines.index(f"HTTP frontend on http://127.0.0.1:{s.http_port}")
    running = lines.index("LMCache cache server is running...")
    assert http < start < running  # between the quick start's lines, which are unchanged
    banner = "\n".join(lines[start:running])
    pool = status["l1"]["shm_segment"].lstrip("/")
    for expected in (
        f"ZMQ:        tcp://127.0.0.1:{s.port} (local engines: ipc://",
        f"HTTP:       http://127.0.0.1:{s.http_port} (/healthcheck /status /metrics /docs)",
        f"dashboard:  http://127.0.0.1:{s.http_port}/",
        f"L1:         0.25 GiB in /dev/shm/{pool}: 0.06 GiB of it has memory now, grows",
        f"L2:         fs:{l2} (store policy all, prefetch policy order, queue 1024)",
        "transfers:  local engines (same uid): engine_driven, lmcache_driven, bytes; "
        "network peers: ping only",
        "eviction:   LRU, on demand and from 80% used down to 60%",
        "admin:      POST/PUT/DELETE from loopback, or with the admin token (set)",
    ):
        assert expected in banner, banner
    assert log.count("---- lmcache ") == 1 and TOKEN not in log


def test_banner_for_any_address_points_the_dashboard_at_localhost() -> None:
    s = start_server("--http-host", "0.0.0.0", "--disable-metrics")
    s.stop()
    log = s.log()
    assert f"dashboard:  http://localhost:{s.http_port}/ (any address of this host)" in log
    assert "/status metrics disabled /docs" in log
    assert "all of it has memory now (pre-faulted)" in log


def test_progress_logs_periodically_and_a_short_step_not_at_all(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = logging.getLogger("lmcache.test.progress")
    n = [0]
    with caplog.at_level(logging.INFO, logger=log.name):
        with Progress(log, lambda: f"working, {n[0]} steps", every_s=0.05):
            for _ in range(12):
                n[0] += 1
                time.sleep(0.02)
        periodic = [r.getMessage() for r in caplog.records]
        assert len(periodic) >= 3  # ~0.24 s at one line per 0.05 s, not one per step (12)
        assert len(periodic) < 12
        assert periodic[0].startswith("working, ") and periodic[0].endswith(" s)")
        assert periodic[-1].startswith("working, 12 steps: done in ")
        caplog.clear()
        with Progress(log, lambda: "quick", every_s=5):
            pass
        assert not caplog.records


def test_progress_survives_a_failing_description(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("lmcache.test.progress")
    with (
        caplog.at_level(logging.INFO, logger=log.name),
        Progress(log, lambda: str(1 / 0), every_s=0.01),
    ):
        time.sleep(0.05)
    assert "progress unavailable: ZeroDivisionError" in caplog.text


def test_fs_index_rebuild_shows_progress(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = FsL2(tmp_path)
    for i in range(300):
        first.put(ObjectKey(i.to_bytes(4, "big") * 12), b"x" * 64)
    first.close()
    monkeypatch.setattr(defaults, "PROGRESS_EVERY_S", 0.001)
    with caplog.at_level(logging.INFO, logger="lmcache.storage.l2.fs"):
        again = FsL2(tmp_path)
    try:
        assert again.stats()["objects"] == 300
    finally:
        again.close()
    done = [r.getMessage() for r in caplog.records if "done in" in r.getMessage()]
    assert done == [done[0]] and done[0].startswith(f"fs:{tmp_path}: indexing, 300 objects in ")


def test_a_large_segment_shows_progress_while_it_gets_memory(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Thresholds lowered so that 64 MiB counts as large: the lines come from the same code.
    monkeypatch.setattr(shm, "_PROGRESS_MIN_BYTES", 0)
    monkeypatch.setattr(shm, "_RESERVE_STEP", 4 << 20)
    monkeypatch.setattr(defaults, "PROGRESS_EVERY_S", 0.001)
    name = f"lmcache_test_progress_{os.getpid()}"
    with caplog.at_level(logging.INFO, logger=shm.logger.name):
        segment = ShmSegment.create(name, 64 << 20)
    try:
        assert segment.reserved == 64 << 20
    finally:
        segment.close()
        segment.unlink()
    text = caplog.text
    assert f"/{name}: 0.1 GiB reserved, pre-faulting its pages: done in " in text
