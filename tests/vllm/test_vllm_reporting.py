"""What our connector reports through vLLM: KV events on vLLM's zmq publisher, and
connector stats in vLLM's log and on its /metrics."""

from __future__ import annotations

import json
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import msgspec
import zmq

from ..conftest import start_server
from .conftest import VllmProcess, kv_config, start_vllm
from .test_vllm_e2e import prompt

BLOCK, CHUNK = 128, 256  # vLLM's CPU block size, the server's default chunk


def metric(vllm: VllmProcess, name: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{vllm.port}/metrics", timeout=10).text
    values = [float(m) for m in re.findall(rf"^{re.escape(name)}\{{[^}}]*\}} (\S+)$", text, re.M)]
    return sum(values)


def stored_events(sub: zmq.Socket[bytes], first: float = 10, quiet: float = 1) -> list[Any]:
    """Every BlockStored event published (the first within ``first`` seconds) until
    ``quiet`` seconds pass without one more."""
    from vllm.distributed.kv_events import BlockStored, KVEventBatch

    decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
    events: list[Any] = []
    while sub.poll(int((quiet if events else first) * 1000)):
        _topic, _seq, payload = sub.recv_multipart()
        events += [e for e in decoder.decode(payload).events if isinstance(e, BlockStored)]
    return events


def test_kv_events_and_connector_stats_reach_vllm(
    tiny_model: Path, vllm_factory: list[VllmProcess]
) -> None:
    server = start_server("--l1-size-gb", "1")
    workdir = Path(tempfile.mkdtemp(prefix="lmcache-kv-events-"))
    endpoint = f"ipc://{workdir}/events.sock"  # vLLM binds it; ours alone
    events_config = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": endpoint}
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    try:
        vllm = start_vllm(
            tiny_model,
            kv_config(server.port),
            extra_args=("--kv-events-config", json.dumps(events_config)),
            env={"VLLM_LOG_STATS_INTERVAL": "1"},
        )
        vllm_factory.append(vllm)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(endpoint)
        time.sleep(0.5)  # the subscription reaches the publisher

        tokens = prompt(21, 700)  # 2 whole chunks, then 1 whole block (a partial chunk)
        vllm.complete(tokens, max_tokens=2)
        server.wait_log("Stored")
        events = stored_events(sub)

        ours = [e for e in events if e.medium == "CPU"]
        assert ours, f"no BlockStored with medium CPU among {events}"
        assert all(e.ownership == "lmcache" and e.block_size == BLOCK for e in ours)
        announced = [t for e in ours for t in e.token_ids]
        assert announced == tokens[: 700 // BLOCK * BLOCK]  # every whole block, in order
        hashes = [h for e in ours for h in e.block_hashes]
        assert len(hashes) == len(set(hashes)) == 700 // BLOCK
        assert ours[0].parent_block_hash is None
        assert all(e.parent_block_hash == hashes[i - 1] for e, i in _starts(ours) if i)

        # The same prompt again: a lookup hit and a load; vLLM's counters move.
        vllm.complete(tokens, max_tokens=2)
        deadline = time.monotonic() + 20
        while metric(vllm, "vllm:lmcache_load_tokens_total") == 0:
            assert time.monotonic() < deadline, "vllm:lmcache_load_tokens_total never moved"
            time.sleep(0.5)
        assert metric(vllm, "vllm:lmcache_store_tokens_total") >= 700 // BLOCK * BLOCK
        assert metric(vllm, "vllm:lmcache_store_bytes_total") > 0
        assert metric(vllm, "vllm:lmcache_lookup_tokens_total") >= 2 * (700 // BLOCK * BLOCK)
        assert metric(vllm, "vllm:lmcache_hit_tokens_total") >= 700 // BLOCK * BLOCK
        assert metric(vllm, "vllm:lmcache_load_bytes_total") > 0
        assert metric(vllm, "vllm:lmcache_failed_loads_total") == 0
        deadline = time.monotonic() + 15
        while "KV Transfer metrics: lookup_tokens=" not in vllm.log():
            assert time.monotonic() < deadline, "no 'KV Transfer metrics' line in vLLM's log"
            time.sleep(0.5)
    finally:
        sub.close(linger=0)
        ctx.term()
        server.stop()


def _starts(events: list[Any]) -> list[tuple[Any, int]]:
    """Each event with the index of its first block among all announced blocks."""
    out, i = [], 0
    for e in events:
        out.append((e, i))
        i += len(e.block_hashes)
    return out
