"""Scenarios every model kind goes through with a real `vllm serve`, written once.

Each model test module (Llama-style, MLA, hybrid, TP=2) builds its own stack (one server,
one vLLM process) and runs these with the token counts its KV layout gives::

    cold request ──> "Stored N"       (the server logs what the connector wrote)
    same request ──> "Retrieved N"    (output identical to the cold one)

The counts differ per model (16- vs 128-token blocks, window groups, one line per TP rank),
so they are parameters; the scenario and its assertions are not.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Sequence

import numpy as np

from ..conftest import ServerProcess, start_server
from .conftest import Completion, VllmProcess


def prompt(seed: int, n: int) -> list[int]:
    tokens: list[int] = np.random.default_rng(seed).integers(10, 2000, size=n).tolist()
    return tokens


def same_output(a: Completion, b: Completion, tolerance: float = 1e-4) -> None:
    """Identical tokens and text; logprobs equal up to float rounding.

    Cached KV is byte-exact, but with a cached prefix vLLM prefills only the tail, through
    another attention path than one pass over the whole prompt, so float32 rounding may
    differ (about 1e-6 here; vLLM's own prefix cache behaves alike). Wrong KV bytes move
    logprobs by orders of magnitude more, and flip tokens.
    """
    assert a.tokens == b.tokens and a.text == b.text
    pairs = zip(a.logprobs, b.logprobs, strict=True)
    assert all(math.isclose(x, y, rel_tol=0, abs_tol=tolerance) for x, y in pairs)


def new_log(server: ServerProcess, since: int) -> str:
    return server.log()[since:]


def metric(text: str, name: str) -> float:
    """The sum of a metric's samples in a Prometheus text page, over its labels (0 if absent)."""
    found = re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M)
    return sum(float(v) for v in found)


def wait_for(vllm: VllmProcess, text: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while text not in vllm.log():
        assert time.monotonic() < deadline, f"{text!r} not in the vLLM log"
        time.sleep(0.2)


def wait_resumed(vllm: VllmProcess, since: int, links: int, timeout: float = 30) -> None:
    """Until ``links`` connector links (the scheduler's and each worker's) logged "caching
    resumed" after the first ``since`` characters of the vLLM log. Each link finds the
    restarted server on its own heartbeat; one that has not yet skips its part of a request
    (a scheduler in degraded mode stores nothing), so a test must wait for all of them."""
    deadline = time.monotonic() + timeout
    while (n := vllm.log()[since:].count("caching resumed")) < links:
        assert time.monotonic() < deadline, f"{n} of {links} links resumed"
        time.sleep(0.2)


def counts(server: ServerProcess, verb: str, since: int) -> list[int]:
    """Token counts of every "<verb> N tokens" line since `since`, sorted."""
    lines = server.log()[since:].splitlines()
    return sorted(int(line.split()[3]) for line in lines if f"{verb} " in line)


def wait_counts(
    server: ServerProcess, verb: str, since: int, expected: Sequence[int], timeout: float = 60
) -> None:
    """Wait until the "<verb> N tokens" lines since `since` are exactly `expected` (one per
    engine: a hybrid model's groups or TP's ranks log their own)."""
    deadline = time.monotonic() + timeout
    while (got := counts(server, verb, since)) != sorted(expected):
        assert time.monotonic() < deadline, f"{verb}: {got}, expected {sorted(expected)}"
        time.sleep(0.1)


def hit_matches_cold(
    server: ServerProcess,
    vllm: VllmProcess,
    tokens: list[int],
    stored: Sequence[int],
    retrieved: Sequence[int],
) -> None:
    """A repeated prompt is stored (one "Stored" line per count in `stored`), then
    retrieved (likewise), with the cold run's tokens and logprobs."""
    since = len(server.log())
    cold = vllm.complete(tokens, ignore_eos=True)
    wait_counts(server, "Stored", since, stored)
    since = len(server.log())
    warm = vllm.complete(tokens, ignore_eos=True)
    wait_counts(server, "Retrieved", since, retrieved)
    assert counts(server, "Stored", since) == []  # nothing new to store
    same_output(cold, warm)


def partial_hit_matches_cold(
    server: ServerProcess,
    vllm: VllmProcess,
    seed: int,
    stored: tuple[int, int],
    retrieved: Sequence[int],
) -> None:
    """A prompt sharing 512 tokens with a stored one loads them (`retrieved`), and gives
    what the same prompt gives on an emptied cache (which stores `stored[1]` tokens)."""
    base = prompt(seed, 600)
    other = base[:512] + prompt(seed + 1, 200)
    vllm.complete(base, ignore_eos=True)
    server.wait_log(f"Stored {stored[0]} tokens")
    since = len(server.log())
    partial = vllm.complete(other, ignore_eos=True)
    wait_counts(server, "Retrieved", since, retrieved)
    assert server.http().post("/clear-cache").status_code == 200
    since = len(server.log())
    cold = vllm.complete(other, ignore_eos=True)
    server.wait_log(f"Stored {stored[1]} tokens", since=since)
    assert "Retrieved" not in server.log()[since:]
    same_output(partial, cold)


def restarted_server_caches_again(
    server: ServerProcess, vllm: VllmProcess, tokens: list[int], stored: int, workers: int = 1
) -> None:
    """The server is stopped under the running vLLM and a new, empty one takes its ports:
    the connector re-registers, stores again, and the next hit gives the cold output.
    ``workers``: vLLM's worker processes (TP ranks), each with its own link."""
    cold = vllm.complete(tokens, ignore_eos=True)
    server.wait_log(f"Stored {stored} tokens")
    since = len(vllm.log())
    server.stop()
    restarted = start_server(
        "--l1-size-gb", "1", "--port", str(server.port), "--http-port", str(server.http_port)
    )
    try:
        wait_resumed(vllm, since, links=1 + workers)
        again = vllm.complete(tokens, ignore_eos=True)  # the new server was empty
        restarted.wait_log(f"Stored {stored} tokens")
        warm = vllm.complete(tokens, ignore_eos=True)
        restarted.wait_log(f"Retrieved {stored} tokens")
        same_output(cold, again)
        same_output(cold, warm)
    finally:
        restarted.stop()
