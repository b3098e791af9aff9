"""The workloads that show what a KV server adds to vLLM's own prefix cache.

* capacity: a working set 2-3x larger than vLLM's KV pool, every prompt sent twice
  round-robin (all once, then all again): by the second time vLLM has evicted it.
* two-instances: a second vLLM instance, started beside the first and sharing its KV
  server, gets the prompts the first one has just served.
* restart: prompts, then a restart of vLLM (the KV server keeps running), the same again.
* decode: tokens/s of 4 concurrent streams after cold prompts that the connector stores.

Prompts come from their own seeded generator (the TTFT and chat prompts stay as they
were) and are identical in every configuration; all of them are distinct from each other.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

from . import procs
from .load import CpuMeter, CpuSampler
from .workload import FIRST_ID, Client


@dataclass
class Scenarios:
    capacity: list[list[int]]  # the working set, sent twice round-robin
    restart: list[list[int]]  # sent before and after a restart of vLLM
    two: list[list[int]]  # sent to instance A, then to instance B
    decode: list[list[int]]  # one prompt per concurrent stream
    decode_output: int
    warmups: list[list[int]]  # distinct prompts: one before each measured series


def make_scenarios(
    *,
    seed: int,
    vocab: int,
    capacity_prompts: int,
    capacity_length: int,
    restart_prompts: int,
    restart_length: int,
    streams: int,
    decode_prompt: int,
    decode_output: int,
) -> Scenarios:
    rng = np.random.default_rng([seed, 1])

    def ids(count: int) -> list[int]:
        return [int(x) for x in rng.integers(FIRST_ID, vocab, count)]

    return Scenarios(
        capacity=[ids(capacity_length) for _ in range(capacity_prompts)],
        restart=[ids(restart_length) for _ in range(restart_prompts)],
        two=[ids(restart_length) for _ in range(restart_prompts)],
        decode=[ids(decode_prompt) for _ in range(streams)],
        decode_output=decode_output,
        warmups=[ids(capacity_length) for _ in range(8)],
    )


class Warmups:
    """Hands out the distinct warm-up prompts in turn."""

    def __init__(self, prompts: Sequence[list[int]]) -> None:
        self.prompts = list(prompts)
        self.next = 0

    def send(self, client: Client) -> float:
        prompt = self.prompts[self.next % len(self.prompts)]
        self.next += 1
        return client.ttft(prompt)


_COUNTERS = {
    "vllm:prefix_cache_queries": "queries",
    "vllm:prefix_cache_hits": "vllm_hits",
    "vllm:external_prefix_cache_queries": "external_queries",
    "vllm:external_prefix_cache_hits": "external_hits",
}


def _metric_sums(client: Client, names: Sequence[str]) -> dict[str, float]:
    """Each of ``names`` from vLLM's /metrics, summed over its label sets (a counter's
    ``_total`` suffix is dropped before matching)."""
    out = dict.fromkeys(names, 0.0)
    for line in client.http.get("/metrics").text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0].removesuffix("_total")
        if name in out and not line.startswith("#"):
            out[name] += float(line.rsplit(" ", 1)[1])
    return out


def prefix_counters(client: Client) -> dict[str, float]:
    """vLLM's own token counters (/metrics): its prefix cache hits and the connector's."""
    sums = _metric_sums(client, list(_COUNTERS))
    return {short: sums[name] for name, short in _COUNTERS.items()}


_DECODE_TIMES = ("vllm:request_decode_time_seconds_sum", "vllm:request_decode_time_seconds_count")


def decode_times(client: Client) -> dict[str, float]:
    """vLLM's own record of its finished requests' decode time (/metrics): from the first
    generated token to the last, as its engine core timed them."""
    return _metric_sums(client, _DECODE_TIMES)


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in after}


def _ms(values: Sequence[float]) -> float:
    return 1e3 * float(np.median(values))


def run_capacity(
    client: Client, sc: Scenarios, warm: Warmups, meter: CpuMeter, logs: Sequence[Path]
) -> dict[str, object]:
    """All prompts once (cold), then all again (round 2). vLLM's counters of round 2 say
    how many prompt tokens its own prefix cache and the connector served; the log
    checks of round 2 that the KV server retrieved them (the server logs at most 20
    identical lines per 10 s and counts the rest in a later "suppressed" line)."""
    warm.send(client)
    meter.start()
    first = [client.ttft(p) for p in sc.capacity]
    load1 = meter.stop()
    marks = procs.log_marks(logs)
    before = prefix_counters(client)
    meter.start()
    second = [client.ttft(p) for p in sc.capacity]
    load2 = meter.stop()
    counters = _delta(prefix_counters(client), before)
    time.sleep(0.5)  # let the last log lines reach the files
    checks = procs.log_checks(logs, since=marks)
    print(
        f"    capacity {len(sc.capacity)} x {len(sc.capacity[0])} tokens: round 1 "
        f"{_ms(first):8.1f} ms  round 2 {_ms(second):8.1f} ms  (others used "
        f"{max(load1['foreign_cores'], load2['foreign_cores']):.2f} cores)\n      round 2:"
        f" of {counters['queries']:.0f} prompt tokens vLLM's cache hit "
        f"{counters['vllm_hits']:.0f}, the connector {counters['external_hits']:.0f}; "
        f"server log: {checks['retrieves']} retrieves",
        flush=True,
    )
    return {
        "round1_s": first, "round2_s": second, "load": load1, "load2": load2,
        "round2_checks": checks, "round2_counters": counters,
    }  # fmt: skip


def run_two_instances(
    client: Client,
    sc: Scenarios,
    warm: Warmups,
    meter: CpuMeter,
    start_b: Callable[[], tuple[Client, Callable[[], None]]],
) -> dict[str, object]:
    """Instance B starts beside A (both share the KV server); A serves the prompts cold,
    then B gets the same prompts: it can only hit what A stored in the server."""
    client_b, stop_b = start_b()
    try:
        warm.send(client)
        warm.send(client_b)
        meter.start()
        a_cold = [client.ttft(p) for p in sc.two]
        b = [client_b.ttft(p) for p in sc.two]
        load = meter.stop()
    finally:
        client_b.close()
        stop_b()
    print(
        f"    two instances {len(sc.two)} x {len(sc.two[0])} tokens: A cold "
        f"{_ms(a_cold):8.1f} ms  B {_ms(b):8.1f} ms  (others used "
        f"{load['foreign_cores']:.2f} cores)",
        flush=True,
    )
    return {"a_cold_s": a_cold, "b_s": b, "load": load}


def run_restart(
    client: Client, sc: Scenarios, warm: Warmups, meter: CpuMeter, restart: Callable[[], Client]
) -> tuple[dict[str, object], Client]:
    """The prompts cold, a restart of vLLM (the server stays up), the prompts again.
    Returns the client of the restarted vLLM (the old one is closed)."""
    warm.send(client)
    meter.start()
    cold = [client.ttft(p) for p in sc.restart]
    load = meter.stop()
    client.close()
    client = restart()
    warm.send(client)  # the new engine's first request, distinct from the measured ones
    meter.start()
    after = [client.ttft(p) for p in sc.restart]
    load2 = meter.stop()
    print(
        f"    restart {len(sc.restart)} x {len(sc.restart[0])} tokens: cold "
        f"{_ms(cold):8.1f} ms  after restart {_ms(after):8.1f} ms  (others used "
        f"{max(load['foreign_cores'], load2['foreign_cores']):.2f} cores)",
        flush=True,
    )
    return {"cold_s": cold, "after_s": after, "load": load, "load2": load2}, client


def _stream_times(client: Client, prompt: list[int], max_tokens: int) -> list[float]:
    """perf_counter() of every streamed token of one completion."""
    body = {
        "model": client.model, "prompt": prompt, "max_tokens": max_tokens,
        "temperature": 0, "ignore_eos": True, "stream": True,
    }  # fmt: skip
    times: list[float] = []
    with (
        httpx.Client(base_url=client.http.base_url, timeout=900) as http,
        http.stream("POST", "/v1/completions", json=body) as response,
    ):
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[6:]).get("choices", []):
                if choice.get("text") is not None:
                    times.append(time.perf_counter())
    return times


def run_decode(client: Client, sc: Scenarios, meter: CpuMeter) -> dict[str, object]:
    """N concurrent streams of decode_output tokens after distinct cold prompts.

    Judged by ``engine_tokens_per_s``: N x (decode_output - 1) tokens over the streams' mean
    decode time as vLLM's engine core timed it (its /metrics). What the client sees,
    ``tokens_per_s``, counts the tokens that arrived while all N streams were decoding
    (from the last stream's first token to the first stream's last) and depends on this
    process getting a CPU: vLLM's processes take 1.94 of the 2 here, and a client thread
    that falls behind reads its tokens late, in a burst (one such pass counted 487 of
    ~1,000 tokens in an equally long window). The cores each of our processes used in that
    window, and the VM's steal, come from `CpuSampler`.
    """
    _stream_times(client, sc.warmups[-1][:64], 16)  # warm-up
    times: list[list[float]] = [[] for _ in sc.decode]
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            times[i] = _stream_times(client, sc.decode[i], sc.decode_output)
        except BaseException as exc:  # reported below, on the main thread
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(sc.decode))]
    before = decode_times(client)
    meter.start()
    with CpuSampler(meter.pgids) as sampler:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    load = meter.stop()
    if errors:
        raise errors[0]
    timed = _delta(decode_times(client), before)
    count, total = timed[_DECODE_TIMES[1]], timed[_DECODE_TIMES[0]]
    engine_rate = len(sc.decode) * (sc.decode_output - 1) * count / total if total > 0 else 0.0
    lo = max(t[0] for t in times)
    hi = min(t[-1] for t in times)
    tokens = sum(1 for t in times for x in t if lo < x <= hi)
    rate = tokens / (hi - lo) if hi > lo else 0.0
    cpu = sampler.between(lo, hi)
    print(
        f"    decode {len(sc.decode)} streams x {sc.decode_output} tokens: "
        f"{engine_rate:7.1f} tokens/s as vLLM timed it ({count:.0f} requests), "
        f"{rate:7.1f} as the client saw it over {hi - lo:.1f} s\n"
        f"      {cpu['own_cores']:.2f} cores ours, {cpu['steal_cores']:.2f} stolen by the VM's "
        f"host, others used {load['foreign_cores']:.2f} cores; by process: "
        + ", ".join(f"{k} {v:.2f}" for k, v in cpu["cores_by_process"].items() if v >= 0.005),
        flush=True,
    )
    return {
        "engine_tokens_per_s": engine_rate, "engine_requests": count,
        "engine_decode_s": total / count if count else None,
        "tokens_per_s": rate, "window_s": hi - lo, "window_tokens": tokens,
        "cores_by_process": cpu["cores_by_process"],
        "chunks": [len(t) for t in times], "load": load,
        "own_cores": cpu["own_cores"], "steal_cores": cpu["steal_cores"],
    }  # fmt: skip
