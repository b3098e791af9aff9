"""A real Redis Cluster on loopback for the tests and the benchmarks: ``redis-server
--cluster-enabled yes`` processes (3 masters + 3 replicas by default), each on a free port
pair (client port, bus port +10000) and in its own directory, made into a cluster with
``redis-cli --cluster create``; and the events a failover test needs.

    RedisCluster.start() ─> N x redis-server ─> redis-cli --cluster create ─> cluster_state:ok
                            and every replica in sync (a replica that never synced will
                            not take over: its data counts as too old)
    kill(port) SIGKILL · wait_failover(port) · restart(port) · wait_rejoined(port)
    reshard(src, dst, n) · stop()

Kept apart from `lmcache.processes` (one server, one redis-server) so that each stays
small; it only ever signals, restarts and removes what it started.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmcache.processes import REDIS_ENV, RedisUnavailable, free_port


def _answers(port: int) -> bool:
    """A redis-server listens on ``port`` (PONG, or NOAUTH when it wants a password)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


def free_cluster_port() -> int:
    """A free loopback port whose cluster bus port (+10000) is free too."""
    return free_port(offsets=(0, 10000))


@dataclass
class ClusterNode:
    """One ``redis-server --cluster-enabled yes`` of a `RedisCluster`, in its own directory."""

    port: int
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class RedisCluster:
    """A throwaway Redis Cluster on loopback: ``masters`` masters with ``replicas`` replicas
    each, created with ``redis-cli --cluster create``, no persistence, every node in its
    own directory under one temporary root. It only ever signals, restarts and removes
    the processes and directories it made.

        start() ─> 6 x redis-server --cluster-enabled yes ─> redis-cli --cluster create
        kill(port) (SIGKILL) · restart(port) · reshard(src, dst, n) · wait_ok() · stop()
    """

    nodes: list[ClusterNode]
    root: Path
    node_timeout_ms: int
    cli: str
    maxmemory_mb: int = 256
    password: str | None = None  # requirepass and masterauth of every node

    @classmethod
    def start(
        cls, masters: int = 3, replicas: int = 1, *, node_timeout_ms: int = 1000,
        timeout: float = 60.0, maxmemory_mb: int = 256, password: str | None = None,
    ) -> RedisCluster:  # fmt: skip
        """Start and create the cluster; RedisUnavailable without redis-server/redis-cli.

        Each node holds at most ``maxmemory_mb`` (allkeys-lru), as a cache tier should be
        run: under continuous writes an unbounded master grows until a returning replica's
        full sync outlasts its output buffer and restarts for ever."""
        server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
        if server is None or cli is None:
            raise RedisUnavailable("redis-server/redis-cli are not installed")
        root = Path(tempfile.mkdtemp(prefix="lmcache-redis-cluster-"))
        nodes: list[ClusterNode] = []
        while len(nodes) < masters * (1 + replicas):
            port = free_cluster_port()
            if all(n.port != port for n in nodes):  # nothing holds a port until launched
                (root / str(port)).mkdir()
                nodes.append(ClusterNode(port, root / str(port)))
        cluster = cls(nodes, root, node_timeout_ms, cli, maxmemory_mb, password)
        try:
            for node in nodes:
                cluster._launch(node, timeout)
            addresses = [f"127.0.0.1:{n.port}" for n in nodes]
            cluster._cli(
                nodes[0].port, "--cluster", "create", *addresses,
                "--cluster-replicas", str(replicas), "--cluster-yes", timeout=timeout,
            )  # fmt: skip
            cluster.wait_ok(timeout, all_nodes=True)
            cluster.wait_replicas(timeout)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _launch(self, node: ClusterNode, timeout: float) -> None:
        assert not node.alive
        conf = node.workdir / "auth.conf"  # the password in a 0600 file, not in argv
        conf.touch(mode=0o600)
        conf.write_text(
            f"requirepass {self.password}\nmasterauth {self.password}\n" if self.password else ""
        )
        node.proc = subprocess.Popen(
            [shutil.which("redis-server") or "redis-server", str(conf), "--port", str(node.port),
             "--bind", "127.0.0.1", "--dir", str(node.workdir), "--save", "",
             "--appendonly", "no", "--cluster-enabled", "yes",
             "--cluster-config-file", "nodes.conf",
             "--cluster-node-timeout", str(self.node_timeout_ms),
             "--repl-diskless-sync-delay", "0",
             "--maxmemory", f"{self.maxmemory_mb}mb", "--maxmemory-policy", "allkeys-lru",
             "--logfile", str(node.workdir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={**os.environ, **REDIS_ENV},  # as our single servers: jemalloc keeps freed pages
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while not _answers(node.port):
            if node.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"cluster node on port {node.port} did not start")
            time.sleep(0.05)

    def _cli(self, port: int, *args: str, timeout: float = 30.0) -> str:
        # The password goes in the environment, not in an argv others can read (ps).
        env = {**os.environ, "REDISCLI_AUTH": self.password} if self.password else None
        done = subprocess.run(
            [self.cli, "-h", "127.0.0.1", "-p", str(port), *args], env=env,
            check=False, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        out = done.stdout.decode(errors="replace")
        if done.returncode != 0 or "[ERR]" in out:
            raise RuntimeError(f"redis-cli {' '.join(args)} failed:\n{out}{done.stderr!r}")
        return out

    def command(self, port: int, *args: str) -> str:
        """One command on one node through redis-cli; its reply as text."""
        return self._cli(port, *args, timeout=10)

    @property
    def url(self) -> str:
        """A seed URL: the first live node (any node serves the whole cluster's map)."""
        return f"redis://{self._userinfo()}127.0.0.1:{self.live()[0].port}"

    def _userinfo(self) -> str:
        return f":{self.password}@" if self.password else ""

    @property
    def seeds_url(self) -> str:
        """Every node as a seed (``redis://h:p1,h:p2,...``): a client made while any one
        of them is down still finds the cluster."""
        hosts = ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)
        return f"redis://{self._userinfo()}{hosts}"

    def live(self) -> list[ClusterNode]:
        return [n for n in self.nodes if n.alive]

    def node(self, port: int) -> ClusterNode:
        (node,) = (n for n in self.nodes if n.port == port)
        return node

    def topology(self) -> list[dict[str, Any]]:
        """CLUSTER NODES as seen by a live node: id, port, role, master id, flags, slots."""
        out = []
        for line in self.command(self.live()[0].port, "CLUSTER", "NODES").splitlines():
            fields = line.split()
            port = fields[1].split("@")[0].rpartition(":")[2] if len(fields) >= 8 else ""
            if not port.isdigit():
                continue  # a node being forgotten or not yet met (no address)
            flags = fields[2].split(",")
            out.append({
                "id": fields[0], "port": int(port),
                "role": "master" if "master" in flags else "replica",
                "master": None if fields[3] == "-" else fields[3],
                "failed": "fail" in flags or "fail?" in flags, "slots": fields[8:],
            })  # fmt: skip
        return out

    def masters(self) -> list[int]:
        """Ports of the masters that serve slots and are not failed."""
        return [
            n["port"] for n in self.topology()
            if n["role"] == "master" and n["slots"] and not n["failed"]
        ]  # fmt: skip

    def node_id(self, port: int) -> str:
        return self.command(port, "CLUSTER", "MYID").strip()

    def slot_of(self, key: str) -> int:
        return int(self.command(self.live()[0].port, "CLUSTER", "KEYSLOT", key).strip())

    def owner(self, slot: int) -> int:
        """The port of the master that serves ``slot`` (per a live node)."""
        for node in self.topology():
            if node["role"] != "master" or node["failed"]:
                continue
            for spec in node["slots"]:
                if spec.startswith("["):
                    continue  # a slot being migrated
                low, _, high = spec.partition("-")
                if int(low) <= slot <= int(high or low):
                    return int(node["port"])
        raise LookupError(f"no live master serves slot {slot}")

    def wait_ok(self, timeout: float = 60.0, all_nodes: bool = False) -> float:
        """Until the live nodes (``all_nodes``: every node) report ``cluster_state:ok``;
        the seconds waited."""
        t0 = time.monotonic()
        while True:
            try:
                nodes = self.nodes if all_nodes else self.live()
                states = {self.command(n.port, "CLUSTER", "INFO").split()[0] for n in nodes}
                if states == {"cluster_state:ok"}:
                    return time.monotonic() - t0
            except (RuntimeError, subprocess.TimeoutExpired):
                pass
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"cluster not ok after {timeout:g}s: {self.topology()}")
            time.sleep(0.1)

    def wait_replicas(self, timeout: float = 60.0) -> float:
        """Until every live replica is in sync with its master: a replica that never
        synced refuses to take over (its data counts as too old), so a failover test must
        not kill a master before this."""
        t0 = time.monotonic()
        while True:
            replicas = [n["port"] for n in self.topology() if n["role"] == "replica"]
            live = {n.port for n in self.live()}
            links = [
                "master_link_status:up" in self.command(p, "INFO", "replication")
                for p in replicas if p in live
            ]  # fmt: skip
            if all(links):
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"replicas not in sync after {timeout:g}s")
            time.sleep(0.1)

    def kill(self, port: int) -> None:
        """SIGKILL one node (its data is lost: there is no persistence)."""
        node = self.node(port)
        if node.proc is not None and node.alive:
            node.proc.kill()
            node.proc.wait()

    def wait_failover(self, dead: int, timeout: float = 60.0) -> float:
        """Until a replica serves the slots of the killed master ``dead`` and the live nodes
        report ok; the seconds waited."""
        t0 = time.monotonic()
        while any(n["port"] == dead and n["slots"] for n in self.topology()):
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"no failover of {dead} after {timeout:g}s")
            time.sleep(0.1)
        self.wait_ok(max(1.0, timeout - (time.monotonic() - t0)))
        return time.monotonic() - t0

    def restart(self, port: int, timeout: float = 30.0) -> None:
        """Start a killed node again on its port and directory: it rejoins from nodes.conf
        (as a replica, if its slots moved to another master meanwhile)."""
        self._launch(self.node(port), timeout)

    def wait_rejoined(self, port: int, timeout: float = 60.0) -> float:
        """Until a restarted node serves as an in-sync replica and every node reports ok;
        the seconds waited."""
        t0 = time.monotonic()
        while True:
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                info = self.command(port, "INFO", "replication")
                if "role:slave" in info and "master_link_status:up" in info:
                    self.wait_ok(max(1.0, timeout - (time.monotonic() - t0)), all_nodes=True)
                    return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"node {port} did not rejoin in {timeout:g}s")
            time.sleep(0.1)

    def reshard(self, source: int, target: int, slots: int, timeout: float = 120.0) -> None:
        """Move ``slots`` slots (and their keys) from master ``source`` to master ``target``
        with ``redis-cli --cluster reshard``."""
        self._cli(
            target, "--cluster", "reshard", f"127.0.0.1:{target}",
            "--cluster-from", self.node_id(source), "--cluster-to", self.node_id(target),
            "--cluster-slots", str(slots), "--cluster-yes", timeout=timeout,
        )  # fmt: skip

    def stop(self) -> None:
        """SIGKILL every node this cluster started and remove its directories."""
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is None:
                node.proc.kill()
                node.proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)
