"""A Docker engine for the image tests (`tests/test_containers.py`): the user's own, or one
this test session starts and stops.

- When ``docker version`` answers (the user's ``DOCKER_HOST`` or the default socket), that
  engine is used and left as it was: the images this session builds stay in it, as after
  the README's own commands.
- Otherwise, as root with Debian's ``docker.io`` installed (CI: ``scripts/setup`` with
  ``LMCACHE_DOCKER_TESTS=1``), a private ``dockerd`` starts with every path of its own under
  a temporary directory (data root, exec root, pid file, unix socket; its own containerd
  under them), no TCP listener, no bridge and no iptables rules (containers use
  ``--network host``, as the README's do), so nothing on the host changes. It is stopped,
  and its directory removed, when the session ends.

::

    private_engine()  ->  dockerd -H unix://<tmp>/docker.sock --data-root <tmp>/data ...
          |                      (SIGTERM at the end: dockerd stops its containerd)
          v
    DockerEngine.env  ->  {"DOCKER_HOST": "unix://<tmp>/docker.sock"}  for `docker`, scripts
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path


class NoDockerEngine(RuntimeError):
    """No engine answers and none can be started here (the message says why)."""


@dataclass
class DockerEngine:
    """How to reach an engine: the environment ``docker`` and our scripts need."""

    env: dict[str, str] = field(default_factory=dict)
    private: bool = False

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """``docker ARGS`` against this engine; raises with docker's stderr on failure."""
        done = subprocess.run(
            ["docker", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env={**os.environ, **self.env},
        )
        if done.returncode != 0:
            raise subprocess.CalledProcessError(
                done.returncode, done.args, done.stdout, f"{done.stderr}\n(docker {args[0]})"
            )
        return done


def _answers(env: dict[str, str]) -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        probe = subprocess.run(
            ["docker", "version", "--format", "{{.Server.Version}}"],
            capture_output=True,
            timeout=20,
            check=False,
            env={**os.environ, **env},
        )
    except subprocess.TimeoutExpired:
        return False
    return probe.returncode == 0


@contextmanager
def docker_engine() -> Iterator[DockerEngine]:
    """The user's engine when one answers, else a private one for the ``with`` block."""
    if _answers({}):
        yield DockerEngine()
        return
    with private_engine() as engine:
        yield engine


@contextmanager
def private_engine(start_timeout: float = 90) -> Iterator[DockerEngine]:
    """A ``dockerd`` of our own (see the module docstring); raises NoDockerEngine if it
    cannot start, with the last lines of its log."""
    dockerd = shutil.which("dockerd")
    if dockerd is None or shutil.which("docker") is None:
        raise NoDockerEngine("no dockerd/docker (Debian: apt-get install docker.io)")
    if os.geteuid() != 0:
        raise NoDockerEngine("no Docker engine answers, and starting one needs root")
    # Short: containerd's socket lives under the exec root, and a unix socket path has
    # at most 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="lmcd-", dir="/tmp"))
    env = {"DOCKER_HOST": f"unix://{root}/docker.sock"}
    log_path = root / "dockerd.log"
    with log_path.open("wb") as log:
        # fmt: off
        argv = [
            dockerd,
            "--data-root", str(root / "data"),
            "--exec-root", str(root / "exec"),
            "--pidfile", str(root / "dockerd.pid"),
            "-H", env["DOCKER_HOST"],
            "--storage-driver", "overlay2",
            "--iptables=false", "--ip6tables=false", "--bridge=none",
        ]
        # fmt: on
        proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + start_timeout
        while not _answers(env):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-3000:]
                raise NoDockerEngine(f"dockerd did not start (exit {proc.poll()}):\n{tail}")
            time.sleep(0.5)
        yield DockerEngine(env=env, private=True)
    finally:
        _stop(proc)
        _unmount_under(root)
        subprocess.run(["rm", "-rf", "--one-file-system", str(root)], check=False)


def _unmount_under(root: Path) -> None:
    """Unmount what dockerd left mounted under ``root`` (its exec root keeps a bind mount of
    its network namespace after it exits), deepest first; nothing outside ``root``."""
    mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    for point in sorted((m for m in mounts if m.startswith(f"{root}/")), key=len, reverse=True):
        subprocess.run(["umount", "--lazy", point], check=False, capture_output=True)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: dockerd and its containerd
        proc.wait()
