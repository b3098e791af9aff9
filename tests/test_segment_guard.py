"""The KV segment guard: an engine killed without its cleanup (vLLM's default shutdown
SIGKILLs its workers) leaves no segment behind, even with no server running.

Real processes and real shared-memory files, in a private LMCACHE_SHM_DIR (so no server
that another test starts can sweep them first and make these pass for the wrong reason).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lmcache.engine.segment_guard import main as guard_main
from lmcache.storage.shm_names import unlink_when_released

ENGINE = """
import sys, time
from lmcache.engine.segment_guard import guard_segments
from lmcache.engine.shm_kv import create_kv_segment
segments = [create_kv_segment(1 << 20) for _ in range(2)]
pid = guard_segments([(s.name, s.fd) for s in segments])
print(pid, *(s.name for s in segments), flush=True)
if sys.argv[1] == "shutdown":  # what the connector does when vLLM lets it
    for s in segments:
        s.close()
        s.unlink()
    print("closed", flush=True)
if sys.argv[1] == "unlink":  # a grouped worker's shutdown: vLLM's tensors keep the mapping
    sys.stdin.readline()  # once the guard waits on the segments
    for s in segments:
        s.unlink()
        s.array[:] = 7
    print("unlinked", int(sum(int(s.array.sum()) for s in segments)), flush=True)
time.sleep(120)
"""


def stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat after the command name; None once the process is gone or a zombie."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return None if fields[0] in ("Z", "X") else fields


Start = Callable[[str], "subprocess.Popen[str]"]


def wait_until(predicate: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Start]:
    procs: list[subprocess.Popen[str]] = []

    def start(mode: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-c", ENGINE, mode],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "LMCACHE_SHM_DIR": str(tmp_path)},
            start_new_session=True,  # its own process group, to kill it as vLLM would
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def started(proc: subprocess.Popen[str]) -> tuple[int, list[str]]:
    assert proc.stdout is not None
    pid, *names = proc.stdout.readline().split()
    return int(pid), [name.lstrip("/") for name in names]


def test_a_killed_engine_and_its_process_group_leave_no_segment(
    engine: Start, tmp_path: Path
) -> None:
    proc = engine("sleep")
    guard, names = started(proc)
    assert sorted(os.listdir(tmp_path)) == sorted(names)
    fields = stat_fields(guard)
    assert fields is not None, "the guard is not running"
    # Out of vLLM's reach: not its child (kill_process_tree walks children), and not in
    # its session or process group (a group kill).
    assert int(fields[1]) != proc.pid
    assert os.getsid(guard) != os.getsid(proc.pid)

    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    wait_until(lambda: os.listdir(tmp_path) == [])
    wait_until(lambda: stat_fields(guard) is None)


def test_a_clean_shutdown_ends_the_guard_without_it_touching_anything(
    engine: Start, tmp_path: Path
) -> None:
    proc = engine("shutdown")
    guard, _ = started(proc)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "closed"
    assert os.listdir(tmp_path) == []
    # A segment that takes one of those names now is somebody else's: the guard is gone.
    wait_until(lambda: stat_fields(guard) is None)
    assert proc.poll() is None  # while the engine lives on


def test_unlinking_ends_the_guard_while_the_engine_keeps_its_mapping(
    engine: Start, tmp_path: Path
) -> None:
    """The lock lives as long as the mapping unless the engine drops it: a guard that
    waited for it outlived a grouped worker's shutdown until its process exited."""
    proc = engine("unlink")
    guard, names = started(proc)
    assert proc.stdin is not None and proc.stdout is not None
    # Not before the guard has the first segment open: one that finds the name gone exits.
    first = str(tmp_path / names[0])
    wait_until(lambda: first in {os.path.realpath(f) for f in Path(f"/proc/{guard}/fd").iterdir()})
    proc.stdin.write("go\n")
    proc.stdin.flush()
    assert proc.stdout.readline().split() == ["unlinked", str(7 * 2 * (1 << 20))]
    assert os.listdir(tmp_path) == []
    wait_until(lambda: stat_fields(guard) is None)
    assert proc.poll() is None


def test_a_name_that_leads_to_another_file_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "lmcache_kv_1_0"
    path.write_bytes(b"x")
    st = path.stat()
    assert not unlink_when_released(str(path), (st.st_dev, st.st_ino + 1))
    assert not unlink_when_released(str(tmp_path / "missing"), (st.st_dev, st.st_ino))
    assert path.exists()
    assert unlink_when_released(str(path), (st.st_dev, st.st_ino))  # nobody holds it
    assert not path.exists()


def test_the_guard_refuses_malformed_arguments() -> None:
    assert guard_main([]) == 2
    assert guard_main(["lmcache_kv_1_0", "1"]) == 2
