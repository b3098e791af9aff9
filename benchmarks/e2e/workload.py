"""The requests: seeded token-id prompts and the client that times them.

Prompts are lists of token ids, drawn once from a seeded generator and sent unchanged to
every configuration, so all of them see exactly the same work. Uniform random ids make
every prompt distinct from its first chunk on: a "cold" request cannot hit anything.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

from .load import CpuMeter

# Ids 0-2 are the tokenizer's special tokens (eos, bos, pad); stay clear of them.
FIRST_ID = 10


@dataclass
class ChatUser:
    prefix: list[int]  # system prompt / shared context
    turns: list[list[int]]  # one user turn per round
    replies: list[list[int]]  # fixed "assistant" ids appended after each round


@dataclass
class Workload:
    warmup: dict[int, list[int]]  # one per length, distinct from the measured prompts
    ttft: dict[int, list[list[int]]]  # N distinct prompts per length
    chat_warmup: list[int]
    chat: list[ChatUser]  # groups of `chat_users` users, one group after the other
    chat_output: int
    chat_users: int


def make_workload(
    *,
    seed: int,
    vocab: int,
    lengths: list[int],
    n: int,
    users: int,
    groups: int,
    rounds: int,
    prefix: int,
    turn: int,
    output: int,
) -> Workload:
    rng = np.random.default_rng(seed)

    def ids(count: int) -> list[int]:
        return [int(x) for x in rng.integers(FIRST_ID, vocab, count)]

    warmup = {length: ids(length) for length in lengths}
    ttft = {length: [ids(length) for _ in range(n)] for length in lengths}
    chat = [
        ChatUser(
            ids(prefix), [ids(turn) for _ in range(rounds)], [ids(output) for _ in range(rounds)]
        )
        for _ in range(users * groups)
    ]
    return Workload(warmup, ttft, ids(prefix + turn), chat, output, users)


class Client:
    """One keep-alive HTTP connection to vLLM's OpenAI-compatible completions route."""

    def __init__(self, port: int, model: Path) -> None:
        self.model = str(model)
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=900)

    def close(self) -> None:
        self.http.close()

    def ttft(self, prompt: list[int]) -> float:
        """Latency of a 1-token completion: prefill (or cache load) plus one step."""
        body = {"model": self.model, "prompt": prompt, "max_tokens": 1, "temperature": 0}
        start = time.perf_counter()
        self.http.post("/v1/completions", json=body).raise_for_status()
        return time.perf_counter() - start

    def stream(self, prompt: list[int], max_tokens: int) -> tuple[float, float, int]:
        """(time to the first streamed token, total time, streamed chunks) of a completion."""
        body = {
            "model": self.model, "prompt": prompt, "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True,
        }  # fmt: skip
        start = time.perf_counter()
        first: float | None = None
        chunks = 0
        with self.http.stream("POST", "/v1/completions", json=body) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                if json.loads(line[6:]).get("choices"):
                    chunks += 1
                    if first is None:
                        first = time.perf_counter() - start
        total = time.perf_counter() - start
        return (first if first is not None else total), total, chunks


def run_ttft(client: Client, work: Workload, meter: CpuMeter) -> dict[str, object]:
    """Per length: a warm-up request, N cold prompts, then the same N again (warm)."""
    out: dict[str, object] = {}
    for length, prompts in work.ttft.items():
        warmup = client.ttft(work.warmup[length])
        meter.start()
        cold = [client.ttft(p) for p in prompts]
        warm = [client.ttft(p) for p in prompts]
        load = meter.stop()
        out[str(length)] = {"warmup_s": warmup, "cold_s": cold, "warm_s": warm, "load": load}
        print(
            f"    {length:5d} tokens: cold {1e3 * float(np.median(cold)):8.1f} ms"
            f"  warm {1e3 * float(np.median(warm)):8.1f} ms"
            f"  (other processes used {load['foreign_cores']:.2f} cores)",
            flush=True,
        )
    return out


def run_chat(client: Client, work: Workload, meter: CpuMeter) -> dict[str, object]:
    """Multi-round chat, users interleaved round-robin, one request at a time; then the
    next group of users (new prompts), so that a comparison of a few percent rests on
    more than one group's 24 requests (one group's median moved by +-4% between passes).

    Each request streams max_tokens=chat_output tokens with ignore_eos; TTFT is the time
    to the first streamed chunk. The history then grows by fixed pseudo-random "reply"
    ids instead of the generated ones, so every configuration sees the same prompts even
    if bf16 numerics make greedy outputs differ between them.
    """
    client.stream(work.chat_warmup, work.chat_output)  # first streamed request: warm-up
    history = [list(u.prefix) for u in work.chat]
    requests: list[dict[str, float]] = []
    rounds = len(work.chat[0].turns) if work.chat else 0
    size = max(1, work.chat_users)
    groups = [
        range(first, min(first + size, len(work.chat))) for first in range(0, len(work.chat), size)
    ]
    meter.start()
    start = time.perf_counter()
    for users in groups:
        for rnd in range(rounds):
            for user in users:
                chat = work.chat[user]
                history[user] += chat.turns[rnd]
                ttft, total, chunks = client.stream(history[user], work.chat_output)
                requests.append(
                    {
                        "user": user, "round": rnd, "prompt_tokens": len(history[user]),
                        "ttft_s": ttft, "total_s": total, "chunks": chunks,
                    }
                )  # fmt: skip
                history[user] += chat.replies[rnd]
    wall = time.perf_counter() - start
    load = meter.stop()
    ttfts = [r["ttft_s"] for r in requests]
    print(
        f"    chat {len(groups)} x {work.chat_users} users x {rounds} rounds: median TTFT "
        f"{1e3 * float(np.median(ttfts)) if ttfts else 0:.1f} ms, wall {wall:.1f} s"
        f" (other processes used {load['foreign_cores']:.2f} cores)",
        flush=True,
    )
    return {"wall_s": wall, "requests": requests, "load": load}
