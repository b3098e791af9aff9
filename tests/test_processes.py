"""`lmcache.processes`, how tests and benchmarks start real servers: the ports they pick,
and a server that loses its port before binding it (CI saw one whose port an outgoing
connection had taken, and 44 tests of one module erred)."""

from __future__ import annotations

import shutil
import socket
from collections.abc import Iterator

import pytest

from lmcache import processes
from lmcache.processes import RedisProcess, ServerProcess, free_port, port_is_free


def _floor() -> int:
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        return int(f.read().split()[0])


def test_free_ports_lie_below_the_ephemeral_range_with_their_offsets_free() -> None:
    floor = _floor()
    ports = [free_port() for _ in range(50)]
    assert all(1024 <= p < floor and port_is_free(p) for p in ports)
    assert len(set(ports)) > 40  # random picks: parallel test workers rarely meet
    pair = free_port(offsets=(0, 10000))
    assert pair + 10000 < floor and port_is_free(pair) and port_is_free(pair + 10000)


@pytest.fixture
def taken() -> Iterator[int]:
    """A port that this test holds (listening), so a server started on it cannot bind."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", free_port()))
        s.listen()
        yield int(s.getsockname()[1])


def test_a_server_whose_port_was_taken_starts_again_on_other_ports(
    taken: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    picks = iter([taken, free_port()])
    spawned: list[ServerProcess] = []
    real_spawn = ServerProcess._spawn

    def first_on_the_taken_port() -> int:
        return next(picks, None) or free_port()

    def spawn(flags: tuple[str, ...], env: dict[str, str] | None) -> ServerProcess:
        spawned.append(real_spawn(flags, env))
        return spawned[-1]

    monkeypatch.setattr(processes, "free_port", first_on_the_taken_port)
    monkeypatch.setattr(ServerProcess, "_spawn", spawn)
    server = ServerProcess.start("--l1-size-gb", "0.01", timeout=30)
    try:
        assert len(spawned) == 2 and spawned[0].port == taken
        assert "Address already in use" in spawned[0].log()
        assert spawned[0].proc.poll() is not None
        assert server is spawned[1] and server.port != taken
        assert server.http_json("GET", "/healthcheck")
    finally:
        server.stop()


def test_a_server_that_fails_for_another_reason_is_not_started_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spawned: list[ServerProcess] = []
    real_spawn = ServerProcess._spawn

    def spawn(flags: tuple[str, ...], env: dict[str, str] | None) -> ServerProcess:
        spawned.append(real_spawn(flags, env))
        return spawned[-1]

    monkeypatch.setattr(ServerProcess, "_spawn", spawn)
    with pytest.raises(RuntimeError, match="server did not start"):
        ServerProcess.start("--l1-size-gb", "-1", timeout=30)
    assert len(spawned) == 1


def test_a_redis_server_whose_port_was_taken_starts_again_on_another(
    taken: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("no redis-server")
    picks = iter([taken])
    monkeypatch.setattr(processes, "free_port", lambda: next(picks, None) or free_port())
    redis = RedisProcess.start()
    try:
        assert redis.port != taken and redis.pong()
    finally:
        redis.stop()
    with pytest.raises(RuntimeError, match="redis-server did not start"):
        RedisProcess.start(port=taken)  # a port the caller named is not replaced
