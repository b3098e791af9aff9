"""What our connector reports through vLLM: KV events on vLLM's zmq publisher, and
connector stats in vLLM's log and on its /metrics."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import msgspec
import zmq

from ..conftest import start_server
from .conftest import VllmProcess, kv_config, start_vllm
from .scenarios import metric, prompt

BLOCK, CHUNK = 128, 256  # vLLM's CPU block size, the server's default chunk


def vllm_metric(vllm: VllmProcess, name: str) -> float:
    return metric(httpx.get(f"http://127.0.0.1:{vllm.port}/metrics", timeout=10).text, name)


def published(sub: zmq.Socket[bytes], kind: str, first: float = 10, quiet: float = 1) -> list[Any]:
    """Every event of ``kind`` (BlockStored, BlockRemoved) with medium CPU that vLLM
    publishes (the first within ``first`` seconds) until ``quiet`` seconds pass without
    one more."""
    from vllm.distributed.kv_events import KVEventBatch

    decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
    events: list[Any] = []
    while sub.poll(int((quiet if events else first) * 1000)):
        _topic, _seq, payload = sub.recv_multipart()
        batch = decoder.decode(payload).events
        events += [e for e in batch if type(e).__name__ == kind and e.medium == "CPU"]
    return events


def test_kv_events_and_connector_stats_reach_vllm(
    tiny_model: Path, vllm_factory: list[VllmProcess]
) -> None:
    server = start_server("--l1-size-gb", "1", "--kv-event-log-size", "1024")
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
        hashes = check_stored(published(sub, "BlockStored"), tokens)

        vllm.complete(tokens, max_tokens=2)  # again: a lookup hit and a load
        check_stats(vllm, whole=700 // BLOCK * BLOCK)

        # The server drops what we stored (no engine asked it to): vLLM announces it.
        published(sub, "BlockStored", first=0.5)  # drain
        server.http_json("POST", "/clear-cache")
        time.sleep(1.5)  # the server's log notices within a maintenance tick
        vllm.complete(prompt(22, 300), max_tokens=4)  # steps, in which the connector polls
        removed = published(sub, "BlockRemoved")
        assert all(e.ownership == "lmcache" for e in removed)
        assert set(hashes) <= {h for e in removed for h in e.block_hashes}
    finally:
        sub.close(linger=0)
        ctx.term()
        server.stop()


def check_stored(events: list[Any], tokens: list[int]) -> list[Any]:
    """Our BlockStored events cover every whole block of the prompt, in order, chained by
    vLLM's own block hashes; returns those hashes."""
    assert events, "no BlockStored with medium CPU"
    assert all(e.ownership == "lmcache" and e.block_size == BLOCK for e in events)
    announced = [t for e in events for t in e.token_ids]
    assert announced == tokens[: len(tokens) // BLOCK * BLOCK]
    hashes = [h for e in events for h in e.block_hashes]
    assert len(hashes) == len(set(hashes)) == len(tokens) // BLOCK
    first = 0
    for e in events:
        assert e.parent_block_hash == (hashes[first - 1] if first else None)
        first += len(e.block_hashes)
    return hashes


def check_stats(vllm: VllmProcess, whole: int) -> None:
    """vLLM's /metrics carry our counters, and its periodic log line shows them."""
    deadline = time.monotonic() + 20
    while vllm_metric(vllm, "vllm:lmcache_load_tokens_total") == 0:
        assert time.monotonic() < deadline, "vllm:lmcache_load_tokens_total never moved"
        time.sleep(0.5)
    assert vllm_metric(vllm, "vllm:lmcache_store_tokens_total") >= whole
    assert vllm_metric(vllm, "vllm:lmcache_store_bytes_total") > 0
    assert vllm_metric(vllm, "vllm:lmcache_lookup_tokens_total") >= 2 * whole
    assert vllm_metric(vllm, "vllm:lmcache_hit_tokens_total") >= whole
    assert vllm_metric(vllm, "vllm:lmcache_load_bytes_total") > 0
    assert vllm_metric(vllm, "vllm:lmcache_failed_loads_total") == 0
    deadline = time.monotonic() + 15
    while "KV Transfer metrics: lookup_tokens=" not in vllm.log():
        assert time.monotonic() < deadline, "no 'KV Transfer metrics' line in vLLM's log"
        time.sleep(0.5)
