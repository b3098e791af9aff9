"""The connector's start without a server: fast, one clear message (no vLLM needed).

The real-vLLM side (the message appears once in vLLM's whole output) is
tests/vllm/test_vllm_resilience.py::test_vllm_fails_clearly_when_no_server.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path

import pytest

from lmcache.defaults import L1_SIZE_GB, SERVER_PORT
from lmcache.integration.vllm import link
from lmcache.integration.vllm.config import ConnectorConfig
from lmcache.integration.vllm.link import (
    LMCacheStartError,
    ServerLink,
    ServerLinkError,
    report_once,
)
from lmcache.processes import free_port
from lmcache.transport.zmq_client import refuses_connections


def test_the_kernel_says_at_once_when_nothing_listens(tmp_path: Path) -> None:
    assert refuses_connections(f"tcp://localhost:{free_port()}")
    assert refuses_connections(f"ipc://{tmp_path}/absent.sock")
    with socket.create_server(("127.0.0.1", 0)) as listening:
        port = listening.getsockname()[1]
        assert not refuses_connections(f"tcp://127.0.0.1:{port}")
        assert not refuses_connections(f"tcp://localhost:{port}")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unix:
        unix.bind(str(tmp_path / "s.sock"))
        unix.listen()
        assert not refuses_connections(f"ipc://{tmp_path}/s.sock")
    assert not refuses_connections("inproc://x")


def test_no_server_fails_fast_and_says_where_and_what_to_do() -> None:
    port = free_port()
    config = ConnectorConfig.from_extra_config({"lmcache.mp.port": port})
    start = time.monotonic()
    with pytest.raises(ServerLinkError) as info:
        ServerLink(config)
    assert time.monotonic() - start < config.rpc_timeout / 2  # refused: no reply wait
    text = str(info.value)
    assert text.startswith(f"Cannot reach the LMCache server at tcp://localhost:{port} (")
    assert "`lmcache server`" in text and "lmcache.mp.port" in text
    assert f"port {SERVER_PORT}, a {L1_SIZE_GB:g} GiB L1 by default" in text
    assert "running?" not in text
    assert info.value.__cause__ is None and info.value.__context__ is None  # no chain to print


def test_a_silent_listener_is_named_after_the_rpc_timeout() -> None:
    """Something accepts connections but never answers (not our server, or a hung one)."""
    with socket.create_server(("127.0.0.1", 0)) as listening:
        port = listening.getsockname()[1]
        stop = threading.Event()

        def accept() -> None:  # hold connections open, say nothing
            held = []
            listening.settimeout(0.1)
            while not stop.is_set():
                try:
                    held.append(listening.accept()[0])
                except TimeoutError:
                    continue
            for conn in held:
                conn.close()

        thread = threading.Thread(target=accept)
        thread.start()
        config = ConnectorConfig.from_extra_config(
            {"lmcache.mp.host": "127.0.0.1", "lmcache.mp.port": port, "lmcache.mp.rpc_timeout": 0.5}
        )
        try:
            with pytest.raises(ServerLinkError, match=r"\(no reply within 0.5s\)"):
                ServerLink(config)
        finally:
            stop.set()
            thread.join()


def test_reported_once_per_process_and_only_by_rank_0(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(link, "_reported", threading.Event())
    exc = link.unreachable("tcp://localhost:1", "connection refused")
    caplog.set_level(logging.ERROR, logger="lmcache.integration")
    raised = [report_once(exc, rank) for rank in (1, 0, 0)]
    assert [r.message for r in caplog.records] == [str(exc)]
    assert all(isinstance(r, LMCacheStartError) for r in raised)
    assert "Cannot reach" not in str(raised[0]) and "LMCache ERROR above" in str(raised[0])
