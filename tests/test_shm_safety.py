"""Shared memory that other processes can break: stale segments.

Liveness of a segment is its creator's advisory lock, never the pid in its name
(pids repeat across PID namespaces that share /dev/shm).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import psutil
import pytest

from lmcache.engine.shm_kv import ShmKVCache
from lmcache.errors import TransferError
from lmcache.processes import free_port
from lmcache.storage.shm import SEAL_BYTES, SegmentExistsError, ShmSegment
from lmcache.storage.shm_names import segment_is_live, unlink_stale_segments

from .conftest import BLOCK, MODEL, ServerProcess, fill_random, register, unique_tokens

# ----- liveness: the creator's lock, not the pid in the name --------------------------------

HOLDER = """
    import sys, time
    from lmcache.storage.shm import ShmSegment
    segment = ShmSegment.create(sys.argv[1], int(sys.argv[2]), exact=True)
    print(segment.name, flush=True)
    time.sleep(600)
"""


def spawn_holder(name: str, size: int = 4096) -> subprocess.Popen[str]:
    """Another process that creates segment ``name`` and keeps it (and its lock) until killed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(HOLDER), name, str(size)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "/" + name, "the holder did not create its segment"
    return proc


def kill(proc: subprocess.Popen[str]) -> None:
    proc.kill()
    proc.wait()


def dead_pid() -> int:
    """A pid that no process of ours has any more."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def shm_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private LMCACHE_SHM_DIR (inherited by the processes the test starts)."""
    monkeypatch.setenv("LMCACHE_SHM_DIR", str(tmp_path))
    return tmp_path


def test_a_live_segment_named_after_a_dead_pid_is_kept(shm_dir: Path) -> None:
    # Seen from another PID namespace, a live engine's pid is a dead (or another) pid.
    name = f"lmcache_kv_{dead_pid()}_0"
    holder = spawn_holder(name)
    try:
        assert segment_is_live(name)
        assert unlink_stale_segments("lmcache_kv_") == []
        assert (shm_dir / name).exists()
    finally:
        kill(holder)
    # Its creator is gone: now it is stale, whatever its name says.
    assert not segment_is_live(name)
    assert unlink_stale_segments("lmcache_kv_") == [name]
    assert not (shm_dir / name).exists()
    assert not segment_is_live(name)  # and a missing segment is not live either


def test_our_own_segments_are_live_and_only_the_prefix_is_swept(shm_dir: Path) -> None:
    mine = ShmSegment.create("lmcache_kv_1_0", 4096)
    try:
        assert segment_is_live("lmcache_kv_1_0")  # live from this process too
        # Stale files: of the prefix (removed) and of another name (left alone).
        for name in ("lmcache_kv_1_1", "other_1_1"):
            (shm_dir / name).write_bytes(b"\0" * 8192)
        os.mkfifo(shm_dir / "lmcache_kv_fifo")  # never opened for long, never removed
        assert unlink_stale_segments("lmcache_kv_") == ["lmcache_kv_1_1"]
        assert sorted(p.name for p in shm_dir.iterdir()) == [
            "lmcache_kv_1_0", "lmcache_kv_fifo", "other_1_1",
        ]  # fmt: skip
    finally:
        mine.close()
        mine.unlink()
    assert not (shm_dir / "lmcache_kv_1_0").exists()


def test_a_stale_pool_of_a_crashed_pid_1_server_is_replaced(shm_dir: Path) -> None:
    # A server that ran as PID 1 (a container) and was killed left its pool behind; the
    # next one is PID 1 again. pid 1 is always alive, so only the lock can tell.
    holder = spawn_holder("lmcache_l1_pool_1", 8192)
    kill(holder)
    assert (shm_dir / "lmcache_l1_pool_1").exists()
    pool = ShmSegment.create("lmcache_l1_pool_1", 1 << 20, exact=True)
    try:
        assert pool.name == "/lmcache_l1_pool_1" and pool.size == 1 << 20
        assert os.path.getsize(shm_dir / "lmcache_l1_pool_1") == (1 << 20) + SEAL_BYTES
        assert segment_is_live("lmcache_l1_pool_1")
    finally:
        pool.close()
        pool.unlink()


def test_a_live_name_is_never_taken_over(shm_dir: Path) -> None:
    # Two servers, each PID 1 of its own namespace, sharing one /dev/shm.
    holder = spawn_holder("lmcache_l1_pool_1", 8192)
    try:
        with pytest.raises(SegmentExistsError, match="in use by a live process"):
            ShmSegment.create("lmcache_l1_pool_1", 4096, exact=True)
        other = ShmSegment.create("lmcache_l1_pool_1", 4096)  # the default: a free name
        try:
            assert other.name == "/lmcache_l1_pool_1_1"
            assert os.path.getsize(shm_dir / "lmcache_l1_pool_1") == 8192 + SEAL_BYTES
        finally:
            other.close()
            other.unlink()
    finally:
        kill(holder)


def test_kv_segments_skip_a_name_that_is_taken(shm_dir: Path) -> None:
    from lmcache.engine import shm_kv

    first = shm_kv.kv_segment_name()  # the next name this process would pick
    index = int(first.rsplit("_", 1)[1]) + 1
    taken = f"lmcache_kv_{os.getpid()}_{index}"
    holder = spawn_holder(taken)  # e.g. an engine with our pid in another namespace
    try:
        kv = ShmKVCache(num_layers=1, num_blocks=4, block_size=16, block_bytes=64)
        try:
            assert kv.segment.name != "/" + taken
            assert kv.segment.name.startswith(f"/lmcache_kv_{os.getpid()}_")
        finally:
            kv.close()
    finally:
        kill(holder)


def test_unlink_after_close_removes_only_our_own_file(shm_dir: Path) -> None:
    segment = ShmSegment.create("lmcache_kv_5_0", 4096)
    segment.close()
    assert segment_is_live("lmcache_kv_5_0")  # closed but not unlinked: still ours
    segment.unlink()
    assert not (shm_dir / "lmcache_kv_5_0").exists()
    # A segment replaced behind our back is somebody else's: unlink leaves it.
    segment = ShmSegment.create("lmcache_kv_5_1", 4096)
    os.unlink(shm_dir / "lmcache_kv_5_1")
    (shm_dir / "lmcache_kv_5_1").write_bytes(b"theirs")
    segment.close()
    segment.unlink()
    assert (shm_dir / "lmcache_kv_5_1").read_bytes() == b"theirs"


# --kill-child: whatever happens to the test, the namespace (the server) dies with unshare.
UNSHARE = ["unshare", "--pid", "--mount-proc", "--kill-child"]


def _can_unshare() -> bool:
    try:
        done = subprocess.run([*UNSHARE, "true"], check=False, capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


needs_pid_namespace = pytest.mark.skipif(
    not _can_unshare(), reason="needs unshare --pid (root or user namespaces)"
)


def start_server_in_pid_namespace() -> tuple[ServerProcess, int]:
    """`start_server`, but the server is PID 1 of a new PID namespace; also returns its
    pid as seen from here (``ServerProcess.proc`` is unshare)."""
    port, http_port = free_port(), free_port()
    log = Path(tempfile.mkstemp(prefix="lmcache-server-", suffix=".log")[1])
    cmd = [
        *UNSHARE, sys.executable, "-m", "lmcache.cli", "server", "--port", str(port),
        "--http-port", str(http_port), "--http-host", "127.0.0.1", "--l1-size-gb", "0.05",
    ]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    server = ServerProcess(proc, port, http_port, log)
    try:
        server.wait_log("LMCache cache server is running...", timeout=30)
        (child,) = psutil.Process(proc.pid).children()
    except BaseException:
        server.stop(signal.SIGKILL)
        raise
    return server, child.pid


def stop_in_namespace(server: ServerProcess, pid: int, sig: int) -> int:
    os.kill(pid, sig)
    return server.proc.wait(timeout=30)  # unshare exits with the server's status


@needs_pid_namespace
def test_servers_in_their_own_pid_namespace(shm_dir: Path) -> None:
    """Real PID namespaces: a server that is PID 1 keeps engines of the host namespace alive,
    and a second PID-1 server starts after the first one was killed."""
    engine = ShmKVCache(num_layers=2, num_blocks=4, block_size=16, block_bytes=64)
    engine_file = shm_dir / engine.segment.name.lstrip("/")
    try:
        first, pid = start_server_in_pid_namespace()
        try:
            assert "Started server process [1]" in first.log()
            assert (shm_dir / "lmcache_l1_pool_1").exists()
            # Our pid means nothing in its namespace; the old check unlinked our segment.
            assert engine_file.exists()
            assert "Removed shared-memory segment" not in first.log()
        finally:
            stop_in_namespace(first, pid, signal.SIGKILL)  # (unshare then exits 1)
            assert not psutil.pid_exists(pid)
        assert (shm_dir / "lmcache_l1_pool_1").exists()  # left behind
        second, pid = start_server_in_pid_namespace()
        try:
            log = second.log()
            assert "Removed shared-memory segment /lmcache_l1_pool_1 of a dead process" in log
            with second.http() as http:
                status = http.get("/status").json()
            assert status["l1"]["shm_segment"] == "/lmcache_l1_pool_1"
            assert engine_file.exists()
        finally:
            assert stop_in_namespace(second, pid, signal.SIGTERM) == 0, second.log()
        assert not (shm_dir / "lmcache_l1_pool_1").exists()
    finally:
        engine.close()


# ----- an engine shrinks its registered segment under the server ----------------------------


@pytest.mark.parametrize("how", ["truncate", "unlink_and_truncate"])
def test_an_engine_that_shrinks_its_segment_gets_errors_and_the_server_lives(
    server: ServerProcess, how: str
) -> None:
    """Once SIGBUS in the server's copy killed it, and every engine lost its cache."""
    victim = ShmKVCache(num_layers=4, num_blocks=64, block_size=BLOCK, block_bytes=2048)
    other = ShmKVCache(num_layers=4, num_blocks=64, block_size=BLOCK, block_bytes=2048)
    client = server.client()
    try:
        fill_random(victim, 1)
        fill_random(other, 2)
        register(client, victim, 9101)
        register(client, other, 9102)
        tokens, ids = unique_tokens(512), list(range(32))
        assert client.store("a", 9101, tokens, start=0, end=256, block_ids=ids[:16]).stored_tokens
        assert client.lookup("a", tokens, **MODEL) == 256

        fd = victim.segment.fd
        if how == "unlink_and_truncate":
            victim.segment.unlink()
        os.ftruncate(fd, 4096)  # the engine shrinks its KV memory to one page
        victim.blocks = np.empty((0, 0, 0, 0), dtype=np.uint8)  # never touch it again here

        with pytest.raises(TransferError, match="truncated or resized"):
            client.store("b", 9101, tokens, start=256, end=512, block_ids=ids[16:])
        with pytest.raises(TransferError, match="truncated or resized"):
            client.retrieve("a", 9101, tokens, start=0, end=256, block_ids=ids[:16])
        assert client.lookup("c", tokens, **MODEL) == 256, "the failed store cached nothing"

        # The server is alive and serves the other engine, byte for byte.
        assert server.proc.poll() is None
        want = other.blocks[:, :, :16].copy()
        mine = unique_tokens(256)
        assert client.store("d", 9102, mine, start=0, end=256, block_ids=ids[:16]).stored_tokens
        assert client.retrieve("d", 9102, mine, start=0, end=256, block_ids=ids[16:]) == 256
        assert np.array_equal(other.blocks[:, :, 16:32], want)
        assert "Traceback" not in server.log()
        server.wait_log(f"KV segment {victim.segment.name} shrank under a copy (SIGBUS caught)")
    finally:
        for instance in (9101, 9102):
            client.unregister(instance)
        other.close()
        victim.segment.close()
        with contextlib.suppress(FileNotFoundError):
            victim.segment.unlink()
