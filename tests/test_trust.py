"""Trust boundaries, attacked on real server processes (README, "Threat model").

Another local uid (through `setpriv`) must not read, overwrite or unregister what an
engine of the server's uid owns; a network peer without an authorized CurveZMQ key may
only ping; an authorized remote peer may use the cache but never map memory, nor act as
an engine that another owner registered.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zmq
import zmq.auth

from lmcache.client import LMCacheClient
from lmcache.engine.shm_kv import ShmKVCache
from lmcache.errors import BadRequestError, ForbiddenError, ServerUnavailableError
from lmcache.protocol.codec import decode_reply, encode
from lmcache.protocol.messages import (
    MAX_REQUEST_ID,
    MAX_SPEC,
    MAX_TOKENS,
    ErrorReply,
    Ping,
    ShmMemory,
    WorkerCopy,
)
from lmcache.server.registry import MAX_ENGINES
from lmcache.storage.shm_names import shm_path
from lmcache.transport.peers import local_socket_path
from lmcache.transport.zmq_client import CurveClientKeys

from .conftest import (
    CHUNK,
    MODEL,
    ServerProcess,
    fill_random,
    register,
    start_server,
    unique_tokens,
)

OTHER_UID = 65534  # nobody
VICTIM = 4242


def _can_switch_uid() -> bool:
    return os.getuid() == 0 and shutil.which("setpriv") is not None


needs_other_uid = pytest.mark.skipif(
    not _can_switch_uid(), reason="switching uid needs root and setpriv (util-linux)"
)


def run_as_other_uid(code: str, *args: str, timeout: float = 60) -> dict[str, str]:
    """Run ``code`` as another uid with this venv's Python; it prints a JSON object."""
    cmd = [
        "setpriv", f"--reuid={OTHER_UID}", f"--regid={OTHER_UID}", "--clear-groups",
        sys.executable, "-c", textwrap.dedent(code), *args,
    ]  # fmt: skip
    env = {**os.environ, "HOME": "/tmp", "PYTHONDONTWRITEBYTECODE": "1"}
    out = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, env=env)
    assert out.returncode == 0, out.stderr
    result: dict[str, str] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


ATTACKER = """
    import json, sys
    from lmcache.client import LMCacheClient
    from lmcache.errors import LMCacheError
    from lmcache.protocol.messages import KVLayout, LayerPlacement, ShmMemory, WorkerCopy

    port, victim, pool, seal = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    client = LMCacheClient.connect("localhost", port, timeout=5)
    out = {}

    def attempt(name, call):
        try:
            out[name] = "ok: " + repr(call())[:200]
        except LMCacheError as exc:
            out[name] = f"{type(exc).__name__}: {exc}"

    pong = client.ping()
    out["endpoint"] = client.endpoint
    out["pong"] = repr(pong)
    model = dict(model_name="m", world_size=1, dtype="bfloat16")
    layout = KVLayout(  # the victim's geometry (any would do)
        num_layers=4, num_blocks=64, block_size=16, block_bytes=2048, block_stride=1024,
        layers=[LayerPlacement(0, i * 131072) for i in range(4)], planes=2, plane_stride=65536)
    attempt("register_pool", lambda: client.register(
        7, rank=0, layout=layout, memory=ShmMemory(segments=[pool], tokens=[seal]), **model))
    attempt("register_worker_copy", lambda: client.register(
        7, rank=0, layout=layout, memory=WorkerCopy(), **model))
    attempt("replace_victim", lambda: client.register(
        victim, rank=0, layout=layout, memory=WorkerCopy(), **model))
    attempt("unregister_victim", lambda: client.unregister(victim))
    attempt("lookup", lambda: client.lookup("x", [1] * 512, **model))
    attempt("retrieve_bytes", lambda: client.retrieve_bytes(
        "x", victim, [1] * 512, start=0, end=256))
    attempt("store_bytes", lambda: client.store_bytes(
        "x", victim, [1] * 512, start=0, end=256, chunks=[b"0" * 16]))
    attempt("clear", client.clear)
    print(json.dumps(out))
"""


Victim = tuple[LMCacheClient, ShmKVCache, np.ndarray]


@pytest.fixture
def victim(server: ServerProcess) -> Iterator[Victim]:
    with engine_with_two_chunks(server) as v:
        yield v


@contextlib.contextmanager
def engine_with_two_chunks(server: ServerProcess) -> Iterator[Victim]:
    """An engine of the server's uid with two chunks stored."""
    kv = ShmKVCache(num_layers=4, num_blocks=64, block_size=16, block_bytes=2048, planes=2)
    try:
        client = server.client()
        register(client, kv, VICTIM)
        fill_random(kv, 11)
        tokens = unique_tokens(2 * CHUNK)
        stored = client.store("v", VICTIM, tokens, start=0, end=2 * CHUNK, block_ids=range(32))
        assert stored.stored_tokens == 2 * CHUNK
        yield client, kv, tokens
        client.unregister(VICTIM)
    finally:
        kv.close()


def _victim_still_served(client: LMCacheClient, kv: ShmKVCache, tokens: np.ndarray) -> None:
    expected = kv.blocks[:, :, :32].copy()
    kv.blocks[:, :, :32] = 0
    assert client.lookup("v2", tokens, **MODEL) == 2 * CHUNK
    got = client.retrieve("v2", VICTIM, tokens, start=0, end=2 * CHUNK, block_ids=range(32))
    assert got == 2 * CHUNK
    np.testing.assert_array_equal(kv.blocks[:, :, :32], expected)
    client.end_session("v2")


@needs_other_uid
def test_another_uid_can_only_ping(server: ServerProcess, victim: Victim) -> None:
    client, kv, tokens = victim
    pong = client.ping()
    assert pong.l1_pool and pong.l1_pool_seal and pong.trusted  # we are a local peer
    out = run_as_other_uid(ATTACKER, str(server.port), str(VICTIM), pong.l1_pool, pong.l1_pool_seal)
    # The local endpoint is not this uid's socket: the attacker stays on TCP, untrusted,
    # and the pong tells it nothing about the pool.
    assert out["endpoint"].startswith("tcp://"), out
    assert "trusted=False" in out["pong"] and "l1_pool=''" in out["pong"], out
    assert pong.l1_pool_seal not in out["pong"]
    for attack in (
        "register_pool", "register_worker_copy", "replace_victim", "unregister_victim",
        "lookup", "retrieve_bytes", "store_bytes", "clear",
    ):  # fmt: skip
        assert out[attack].startswith("ForbiddenError: "), (attack, out[attack])
        assert "not authenticated" in out[attack]
    assert client.ping(VICTIM).engine_registered
    _victim_still_served(client, kv, tokens)
    assert "refused for uid" not in server.log()  # TCP peers are anonymous: no uid claimed
    assert "refused for unauthenticated peer" in server.log()


@needs_other_uid
def test_another_uid_cannot_connect_to_the_local_endpoint(server: ServerProcess) -> None:
    path = local_socket_path(server.port)
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    out = run_as_other_uid(
        """
        import json, socket, sys
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(sys.argv[1])
            print(json.dumps({"connect": "ok"}))
        except OSError as exc:
            print(json.dumps({"connect": type(exc).__name__}))
        """,
        path,
    )
    assert out == {"connect": "PermissionError"}


def test_status_and_log_show_no_seal(server: ServerProcess, victim: Victim) -> None:
    client, kv, _ = victim
    pong = client.ping()
    with server.http() as http:
        status = http.get("/status").text
    for secret in (pong.l1_pool_seal, kv.memory.tokens[0]):
        assert secret not in status
        assert secret not in server.log()


def test_the_server_maps_only_engine_kv_segments(server: ServerProcess, engine: ShmKVCache) -> None:
    client = server.client()
    pong = client.ping()
    for memory in (
        ShmMemory(segments=[pong.l1_pool], tokens=[pong.l1_pool_seal]),  # its own pool
        ShmMemory(segments=[f"lmcache_zmq_{server.port}.sock"], tokens=["00" * 16]),
        ShmMemory(segments=["/lmcache_kv_1_1/../x"], tokens=["00" * 16]),
    ):
        with pytest.raises(ForbiddenError, match="not an engine KV segment"):
            client.register(5, rank=0, layout=engine.layout, memory=memory, **MODEL)
    assert not client.ping(5).engine_registered


# ----- CurveZMQ: authenticated network peers ----------------------------------------------


@pytest.fixture(scope="module")
def curve_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="lmcache-curve-") as tmp:
        base = Path(tmp)
        (base / "authorized").mkdir(mode=0o700)
        (base / "clients").mkdir()
        zmq.auth.create_certificates(str(base / "clients"), "engine")
        zmq.auth.create_certificates(str(base / "clients"), "stranger")
        shutil.copy(base / "clients" / "engine.key", base / "authorized" / "engine.key")
        yield base


@pytest.fixture(scope="module")
def curve_server(curve_dir: Path) -> Iterator[ServerProcess]:
    s = start_server("--curve-keys-dir", str(curve_dir))
    yield s
    s.stop()


def _remote_client(server: ServerProcess, curve_dir: Path, who: str) -> LMCacheClient:
    """A client as on another host: TCP with CurveZMQ, never the local endpoint."""
    from lmcache.transport.zmq_client import ZmqTransport

    keys = CurveClientKeys.from_files(
        str(curve_dir / "server.key"), str(curve_dir / "clients" / f"{who}.key_secret")
    )
    return LMCacheClient(ZmqTransport(f"tcp://127.0.0.1:{server.port}", 5.0, keys))


def test_curve_peers_use_the_cache_but_never_map_memory(
    curve_server: ServerProcess, curve_dir: Path
) -> None:
    kv = ShmKVCache(num_layers=4, num_blocks=64, block_size=16, block_bytes=2048, planes=2)
    local = curve_server.client()
    remote = _remote_client(curve_server, curve_dir, "engine")
    try:
        assert local.endpoint.startswith("ipc://")  # locals go around CurveZMQ
        register(local, kv, VICTIM)
        pong = remote.ping()
        assert pong.trusted and not pong.l1_pool and not pong.l1_pool_seal
        with pytest.raises(ForbiddenError, match="needs shared memory"):
            remote.register(9, rank=0, layout=kv.layout, memory=kv.memory, **MODEL)
        with pytest.raises(ForbiddenError, match="registered by another client"):
            remote.unregister(VICTIM)
        with pytest.raises(ForbiddenError, match="every tenant's keys: local peers only"):
            remote.poll_kv_events()  # the log names every tenant's chunk keys
        with pytest.raises(ForbiddenError, match="another client"):
            remote.register(VICTIM, rank=0, layout=kv.layout, memory=WorkerCopy(), **MODEL)
        # Its own registration works, in bytes mode, with byte-exact results.
        remote.register(9, rank=0, layout=kv.layout, memory=WorkerCopy(), **MODEL)
        tokens = unique_tokens(CHUNK)
        chunk = np.random.default_rng(3).integers(0, 256, 4 * 2 * 16 * 1024, dtype=np.uint8)
        stored = remote.store_bytes("r", 9, tokens, start=0, end=CHUNK, chunks=[chunk])
        assert stored.stored_tokens == CHUNK
        assert remote.lookup("r2", tokens, **MODEL) == CHUNK
        (frame,) = remote.retrieve_bytes("r2", 9, tokens, start=0, end=CHUNK)
        assert bytes(frame) == chunk.tobytes()
        remote.end_session("r2")
        # The local engine cannot act as the remote one either.
        with pytest.raises(ForbiddenError):
            local.unregister(9)
        remote.unregister(9)
        assert local.ping(VICTIM).engine_registered
    finally:
        local.unregister(VICTIM)
        remote.close()
        kv.close()


def test_curve_refuses_unknown_keys_and_plain_tcp(
    curve_server: ServerProcess, curve_dir: Path
) -> None:
    stranger = _remote_client(curve_server, curve_dir, "stranger")
    from lmcache.transport.zmq_client import ZmqTransport

    plain = LMCacheClient(ZmqTransport(f"tcp://127.0.0.1:{curve_server.port}", 1.0))
    try:
        with pytest.raises(ServerUnavailableError):
            stranger.ping(timeout=1.0)
        with pytest.raises(ServerUnavailableError):
            plain.ping(timeout=1.0)
    finally:
        stranger.close()
        plain.close()
    curve_server.wait_log("its key is not authorized")


# ----- bounded fields and frames -------------------------------------------------------------


def test_fields_beyond_their_limits_are_bad_requests(server: ServerProcess) -> None:
    client = server.client()
    with pytest.raises(BadRequestError, match="request_id"):
        client.lookup("r" * (MAX_REQUEST_ID + 1), [1] * 4, **MODEL)
    with pytest.raises(BadRequestError, match="kv_spec"):
        client.lookup("r", [1] * 4, kv_spec="s" * (MAX_SPEC + 1), **MODEL)
    with pytest.raises(BadRequestError, match="tokens"):
        client.lookup("r", np.zeros(MAX_TOKENS + 1, dtype=np.uint32), **MODEL)
    assert client.ping().trusted  # and the server still serves


def test_registrations_are_bounded(server: ServerProcess, engine: ShmKVCache) -> None:
    client = server.client()
    ids = range(10_000, 10_000 + MAX_ENGINES)
    try:
        for i in ids:
            client.register(i, rank=0, layout=engine.layout, memory=WorkerCopy(), **MODEL)
        with pytest.raises(BadRequestError, match="too many registered engines"):
            client.register(99, rank=0, layout=engine.layout, memory=WorkerCopy(), **MODEL)
        client.register(ids[0], rank=0, layout=engine.layout, memory=WorkerCopy(), **MODEL)
    finally:
        for i in ids:
            client.unregister(i)
    client.register(99, rank=0, layout=engine.layout, memory=WorkerCopy(), **MODEL)
    client.unregister(99)


def test_a_frame_over_the_limit_gets_an_error_reply(server: ServerProcess) -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"ipc://{local_socket_path(server.port)}")
    try:
        big = bytearray((256 << 20) + 1)
        sock.send_multipart([encode(Ping(id=77)), big])
        assert sock.poll(30_000), "no reply to an oversized frame"
        reply = decode_reply(sock.recv_multipart()[0])
        assert isinstance(reply, ErrorReply) and reply.code == "bad_request"
        assert "exceeds the limit" in reply.message
        sock.send(encode(Ping(id=78)))  # the connection still works
        assert sock.poll(10_000)
        assert decode_reply(sock.recv()).id == 78
    finally:
        sock.close()
        ctx.term()


# ----- dead engines -------------------------------------------------------------------------

DYING_ENGINE = """
    import sys, time
    import numpy as np
    from lmcache.client import LMCacheClient
    from lmcache.engine.shm_kv import ShmKVCache

    port, iid, tokens = int(sys.argv[1]), int(sys.argv[2]), bytes.fromhex(sys.argv[3])
    kv = ShmKVCache(num_layers=4, num_blocks=64, block_size=16, block_bytes=2048, planes=2)
    client = LMCacheClient.connect("localhost", port, timeout=10)
    model = dict(model_name="m", world_size=1, dtype="bfloat16")
    client.register(iid, rank=0, layout=kv.layout, memory=kv.memory, **model)
    hit = client.lookup("dying-request", tokens, **model)  # pins the chunks it found
    print(kv.segment.name, hit, flush=True)
    time.sleep(600)
"""


def dying_engine(
    port: int, iid: int, tokens: np.ndarray, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """DYING_ENGINE as GPU ID ``iid``; it prints its segment's name and its hit, then waits."""
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(DYING_ENGINE), str(port), str(iid),
         tokens.tobytes().hex()],
        stdout=subprocess.PIPE, text=True, env={**os.environ, **(env or {})},
    )  # fmt: skip


@pytest.fixture
def private_shm(tmp_path: Path) -> dict[str, str]:
    """A shared-memory directory of the test's own (LMCACHE_SHM_DIR, for the server and its
    engines): servers that other tests start meanwhile sweep the dead segments of /dev/shm
    at start-up, and would remove the one a test waits for its own server to remove."""
    return {"LMCACHE_SHM_DIR": str(tmp_path)}


def test_an_engine_killed_with_sigkill_is_forgotten(
    private_shm: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # In a directory of its own (the victim's segment too): a server that another test
    # starts meanwhile sweeps the dead segment at its start-up, and CI saw it do so first.
    monkeypatch.setenv("LMCACHE_SHM_DIR", private_shm["LMCACHE_SHM_DIR"])
    server = start_server("--lock-ttl-s", "30")
    try:
        with engine_with_two_chunks(server) as victim:
            _a_killed_engine_is_forgotten(server, victim)
    finally:
        server.stop()


def _a_killed_engine_is_forgotten(server: ServerProcess, victim: Victim) -> None:
    client, kv, tokens = victim
    proc = dying_engine(server.port, 777, tokens)
    try:
        assert proc.stdout is not None
        segment, hit = proc.stdout.readline().split()
        assert int(hit) == 2 * CHUNK
        with server.http() as http:
            status = http.get("/status").json()
        assert any(e["instance_id"] == 777 for e in status["engines"])
        assert status["l1"]["locked"] >= 2
    finally:
        proc.kill()
        proc.wait()
    server.wait_log("Unregistered GPU ID 777: its process", timeout=10)
    server.wait_log("Released the lookup locks of 1 requests", timeout=10)
    with server.http() as http:
        status = http.get("/status").json()
    assert not any(e["instance_id"] == 777 for e in status["engines"])
    assert status["l1"]["locked"] == 0
    assert not client.ping(777).engine_registered
    _victim_still_served(client, kv, tokens)
    # Its KV segment (its whole KV cache) does not stay behind in /dev/shm.
    server.wait_log(f"removed its segments {segment}", timeout=10)
    assert not os.path.exists(shm_path(segment))


def test_an_engine_forgotten_while_silent_leaves_no_segment_when_it_dies(
    private_shm: dict[str, str],
) -> None:
    """Frozen past --engine-timeout-s, the engine is unregistered while its process still
    holds its KV segment; SIGKILLed later (and not yet waited for: a zombie), its segment is
    removed all the same. The chaos test found one left behind that way."""
    server = start_server("--engine-timeout-s", "1", env=private_shm)
    proc = dying_engine(server.port, 778, np.arange(CHUNK, dtype=np.uint32), env=private_shm)
    try:
        assert proc.stdout is not None
        segment = proc.stdout.readline().split()[0]
        path = Path(private_shm["LMCACHE_SHM_DIR"]) / segment.lstrip("/")
        proc.send_signal(signal.SIGSTOP)
        server.wait_log("Unregistered GPU ID 778: silent for 1 s", timeout=15)
        assert path.exists()  # its frozen process still holds it
        proc.send_signal(signal.SIGKILL)  # not waited for until the end: a zombie meanwhile
        server.wait_log(f"Removed the segments {segment} of process {proc.pid}", timeout=15)
        assert not path.exists()
    finally:
        proc.kill()
        proc.wait()
        assert server.stop() == 0


def test_a_server_stopped_right_after_an_engine_died_removes_its_segment(
    private_shm: dict[str, str],
) -> None:
    """vLLM's default shutdown SIGKILLs its workers, and the server is often stopped right
    after (compose down, a test's teardown), before its once-a-second reap: the stopping
    server removes the dead engine's segment itself, waiting for a process still exiting."""
    server = start_server(env=private_shm)
    proc = dying_engine(server.port, 780, np.arange(CHUNK, dtype=np.uint32), env=private_shm)
    stopped = False
    try:
        assert proc.stdout is not None
        segment = proc.stdout.readline().split()[0]
        path = Path(private_shm["LMCACHE_SHM_DIR"]) / segment.lstrip("/")
        assert path.exists()
        proc.kill()  # not waited for: it may still be exiting when the server stops
        assert server.stop() == 0
        stopped = True
        assert not path.exists(), server.log()[-2000:]
        assert segment in server.log()  # removed by the server (its reap or its exit sweep)
    finally:
        proc.kill()
        proc.wait()
        if not stopped:
            server.stop()
