"""Fuzzing the engine-facing protocol against a real server process.

Hypothesis throws garbage frames, random msgpack maps, frames that no msgpack decoder
can read (invalid UTF-8, very deep nesting, unhashable keys), stray and mis-sized data
frames, and structurally valid requests with hostile field values (ints up to 2**64-1,
wrong seals, layouts bigger than the L1 pool, engines that share an identity but not a
layout, other engines' transfer ids) at a live ``lmcache server`` over a raw DEALER
socket. Every message must get exactly one typed reply in time (with its data frames,
for ``retrieve_bytes``), a request that fails to decode must get exactly the codec's
verdict, the server must stay healthy, normal round trips (shared memory and bytes in
the message) must still be byte-exact, and no lock, lease, session, prepared transfer
or write reservation may leak.

The harness, bottom up: `wire` (the raw client and the shared constants), `corpus` (the
server's real values and what the fuzzing left open), `values` and `calls` (hostile values
and whole requests), `frames` (frames that are not requests), `checks` (what a reply must
be), conftest.py (one server per test module). The tests: `test_fuzzers` (the fuzzers,
then a check of the server they hammered), `test_kv_events` (the KV event messages, on a
server that keeps a log) and `test_regressions` (the server bugs that earlier versions of
the fuzzers found, now fixed, and strict-xfail tests for what is still broken: the
fuzzers accept only those exact deviations, each pointing at its xfail test).

``LMCACHE_FUZZ_SCALE=20`` multiplies every fuzzer's example count (`values.fuzz`).
"""
