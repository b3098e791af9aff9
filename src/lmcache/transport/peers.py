"""Who sent a request: the server's trust boundary, decided by the kernel or by a key.

    peer                                    how the server knows              trust
    a process of the server's uid, this     Unix-socket endpoint: the kernel  LOCAL: everything
      host                                    reports its uid (SO_PEERCRED)
    a network peer holding an authorized    CurveZMQ handshake                REMOTE: cache data,
      CurveZMQ key                                                               never memory maps
    anyone else (plain TCP, other uids)     nothing proves who it is          NONE: ping only

libzmq asks a ZAP handler (ZeroMQ RFC 27) about every new connection, before any
message of it is delivered; the handler's answer (a *user id*) then travels with
every message of that connection. So the socket loop learns the peer of a message
by reading one property of its first frame, never from anything the peer wrote.

    engine ──connect──> ROUTER ──ZAP request (address "…:uid:gid:pid" or IP, key)──> ZapHandler
                          │     <──────────────────── 200 + user id "local:1000:4242" ──┘
                          └─ every message: frame.get("User-Id") ──> Peer(trust, owner)
"""

from __future__ import annotations

import enum
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import zmq

logger = logging.getLogger(__name__)

ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # fixed by the ZAP specification
LOCAL_DOMAIN = b"lmcache-local"
TCP_DOMAIN = b"lmcache-tcp"


def local_socket_path(port: int) -> str:
    """Where a server with ZMQ port ``port`` binds its local endpoint: beside the shared
    memory segments, so an engine that can reach one can reach the other."""
    from lmcache.storage.shm_names import shm_dir

    return os.path.join(shm_dir(), f"lmcache_zmq_{port}.sock")


class Trust(enum.IntEnum):
    NONE = 0
    REMOTE = 1
    LOCAL = 2


@dataclass(frozen=True, slots=True)
class Peer:
    """An authenticated sender. ``owner`` names whom its registrations and sessions belong
    to: a uid for local peers (processes of one uid can read each other's memory anyway),
    a public key for remote ones."""

    trust: Trust
    owner: str
    label: str  # for error messages and logs: "uid 1000 (pid 42)", "tcp peer 10.0.0.2"
    pid: int | None = None

    @property
    def is_local(self) -> bool:
        return self.trust is Trust.LOCAL


# Requests made inside the server process (tests, the in-process transport).
IN_PROCESS = Peer(Trust.LOCAL, f"uid:{os.getuid()}", "in-process")


def peer_from_user_id(user_id: str, allowed_uid: int) -> Peer:
    """Decode what `ZapHandler` attached to a connection."""
    kind, _, rest = user_id.partition(":")
    if kind == "local":
        uid_text, _, pid_text = rest.partition(":")
        if uid_text.isdigit():
            uid = int(uid_text)
            pid = int(pid_text) if pid_text.isdigit() else None
            label = f"uid {uid} (pid {pid})"
            trust = Trust.LOCAL if uid == allowed_uid else Trust.NONE
            return Peer(trust, f"uid:{uid}", label, pid)
    if kind == "curve" and rest:
        return Peer(Trust.REMOTE, user_id, f"key {rest[:8]}…")
    return Peer(Trust.NONE, "anonymous", f"unauthenticated peer {rest or '?'}")


@dataclass(frozen=True)
class CurveServerKeys:
    """The server's CurveZMQ key pair and the client public keys it accepts (Z85)."""

    public: bytes
    secret: bytes
    authorized: frozenset[bytes]

    @classmethod
    def from_dir(cls, directory: str | Path) -> CurveServerKeys:
        """``DIR/server.key_secret`` (created on first use, with ``server.key`` for clients)
        and every ``DIR/authorized/*.key`` client certificate."""
        import zmq.auth

        base = Path(directory)
        base.mkdir(mode=0o700, parents=True, exist_ok=True)
        secret_file = base / "server.key_secret"
        if not secret_file.exists():
            zmq.auth.create_certificates(str(base), "server")
            secret_file.chmod(0o600)
        public, secret = zmq.auth.load_certificate(str(secret_file))
        if secret is None:
            raise ValueError(f"{secret_file} holds no secret key")
        authorized_dir = base / "authorized"
        authorized_dir.mkdir(mode=0o700, exist_ok=True)
        keys = frozenset(zmq.auth.load_certificates(str(authorized_dir)))
        return cls(public, secret, keys)


class ZapHandler:
    """Answers libzmq's authentication requests for the server's sockets (one thread)."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], curve: CurveServerKeys | None) -> None:
        self._curve = curve
        self._sock = ctx.socket(zmq.REP)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(ZAP_ENDPOINT)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lmcache-zap", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(100):
                continue
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK)
            except zmq.ZMQError:
                continue
            self._sock.send_multipart(self._answer(frames))

    def _answer(self, frames: list[bytes]) -> list[bytes]:
        if len(frames) < 6:  # not a ZAP request: cannot even echo its id
            return [b"1.0", b"", b"500", b"malformed", b"", b""]
        version, request_id, domain, address, _identity, mechanism = frames[:6]
        status, text, user_id = b"200", b"OK", self.user_id(domain, address, mechanism, frames[6:])
        if user_id is None:
            status, text, user_id = b"400", b"key not authorized", b""
            logger.warning("refused a CurveZMQ client from %s: its key is not authorized",
                           address.decode(errors="replace")[:64])  # fmt: skip
        return [version, request_id, status, text, user_id, b""]

    def user_id(
        self, domain: bytes, address: bytes, mechanism: bytes, credentials: list[bytes]
    ) -> bytes | None:
        """The user id for a new connection, or None to refuse it."""
        if domain == LOCAL_DOMAIN:
            # libzmq reports a Unix-socket peer as "<host>:<uid>:<gid>:<pid>" (SO_PEERCRED).
            parts = address.decode(errors="replace").rsplit(":", 3)
            if len(parts) == 4 and parts[1].isdigit():
                return f"local:{parts[1]}:{parts[3]}".encode()
            return b"anon:local"
        if mechanism == b"CURVE" and self._curve is not None and credentials:
            import zmq.utils.z85

            key = zmq.utils.z85.encode(credentials[0])
            if key not in self._curve.authorized:
                return None
            return b"curve:" + key
        return b"anon:" + address[:64]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._sock.close(linger=0)
