"""Admin endpoints closed to the network, and no secret in a real server's /status or log
(the masking itself, and the log guard, are unit-tested in test_redaction.py).

Real servers bound to 0.0.0.0; the non-loopback peer is a process in a network namespace
of its own, joined to the host by a veth pair (10.x.y.1 host side, 10.x.y.2 peer side).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from pydantic import SecretStr

from lmcache.engine.shm_kv import ShmKVCache
from lmcache.http.security import bearer_matches, is_loopback
from lmcache.settings import ServerSettings

from .conftest import CHUNK, ServerProcess, register, start_server, unique_tokens

TOKEN = "adm-" + "7f3a9c2e5b1d4086" * 2
REDIS_SECRET = "s3cret"
REDIS_URL = f"redis://:{REDIS_SECRET}@127.0.0.1:1/0"  # nothing listens: a degraded adapter

# ----- a peer on another address: a network namespace -------------------------------------


@dataclass
class Peer:
    """A network namespace whose address reaches the host's as a non-loopback peer."""

    namespace: str
    host_address: str  # the host's end of the veth, where the servers listen (0.0.0.0)

    def request(
        self, method: str, port: int, path: str, authorization: str = ""
    ) -> tuple[int, dict[str, str], str]:
        """(status, headers, body) of one request sent from inside the namespace."""
        out = subprocess.run(
            ["ip", "netns", "exec", self.namespace, sys.executable, "-c", _PEER_SCRIPT,
             method, f"http://{self.host_address}:{port}{path}", authorization],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout  # fmt: skip
        reply = json.loads(out)
        return reply["status"], reply["headers"], reply["body"]


_PEER_SCRIPT = """
import json, sys, urllib.error, urllib.request
method, url, authorization = sys.argv[1:4]
request = urllib.request.Request(url, method=method)
if authorization:
    request.add_header("Authorization", authorization)
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
try:
    with opener.open(request, timeout=10) as response:
        status, headers, body = response.status, dict(response.headers), response.read()
except urllib.error.HTTPError as error:
    status, headers, body = error.code, dict(error.headers), error.read()
print(json.dumps({"status": status, "headers": headers, "body": body.decode()}))
"""


def _peer_forwarded(peer: Peer, port: int, forwarded_for: str) -> int:
    """Status of a POST /clear-cache from the peer that claims to forward `forwarded_for`."""
    script = (
        "import http.client, sys\n"
        "c = http.client.HTTPConnection(sys.argv[1], int(sys.argv[2]), timeout=10)\n"
        "c.request('POST', '/clear-cache', headers={'X-Forwarded-For': sys.argv[3]})\n"
        "print(c.getresponse().status)\n"
    )
    out = subprocess.run(
        ["ip", "netns", "exec", peer.namespace, sys.executable, "-c", script,
         peer.host_address, str(port), forwarded_for],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout  # fmt: skip
    return int(out)


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)


@pytest.fixture(scope="module")
def peer() -> Iterator[Peer]:
    if shutil.which("ip") is None:
        pytest.skip("no `ip` command (apt-get install iproute2): cannot make a network peer")
    tag = f"{os.getpid() % 10000:04d}{random.randrange(1 << 16):04x}"
    namespace, host_end, peer_end = f"lmc-test-{tag}", f"lmc{tag}a", f"lmc{tag}b"
    used = _ip("-4", "-o", "addr").stdout
    subnet = next(
        f"10.{a}.{b}"
        for a, b in ((random.randrange(1, 255), random.randrange(0, 255)) for _ in range(100))
        if f" 10.{a}.{b}." not in used
    )
    created = _ip("netns", "add", namespace)
    if created.returncode != 0:
        pytest.skip(f"cannot create a network namespace (needs root): {created.stderr.strip()}")
    try:
        for args in (
            ("link", "add", host_end, "type", "veth", "peer", "name", peer_end),
            ("link", "set", peer_end, "netns", namespace),
            ("addr", "add", f"{subnet}.1/30", "dev", host_end),
            ("link", "set", host_end, "up"),
            ("netns", "exec", namespace, "ip", "addr", "add", f"{subnet}.2/30", "dev", peer_end),
            ("netns", "exec", namespace, "ip", "link", "set", peer_end, "up"),
            ("netns", "exec", namespace, "ip", "link", "set", "lo", "up"),
        ):
            step = _ip(*args)
            if step.returncode != 0:
                pytest.skip(f"cannot set up the veth pair (`ip {' '.join(args)}`): {step.stderr}")
        yield Peer(namespace, f"{subnet}.1")
    finally:
        _ip("link", "del", host_end)  # also removes its peer end
        _ip("netns", "del", namespace)


# ----- servers -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def open_server() -> Iterator[ServerProcess]:
    """On every address, no admin token: mutating endpoints are loopback only."""
    s = start_server("--http-host", "0.0.0.0")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def guarded_server() -> Iterator[ServerProcess]:
    """On every address, with an admin token and a Redis password, logging everything."""
    s = start_server(
        "--http-host", "0.0.0.0", "--admin-token", TOKEN, "--log-level", "DEBUG",
        "--l2-adapter", json.dumps({"type": "redis", "url": REDIS_URL, "timeout_s": 0.2}),
    )  # fmt: skip
    yield s
    s.stop()


def _store_one(server: ServerProcess, engine: ShmKVCache, instance_id: int) -> None:
    client = server.client()
    register(client, engine, instance_id)
    tokens = unique_tokens(CHUNK)
    reply = client.store(
        f"sec-{instance_id}", instance_id, tokens, start=0, end=CHUNK, block_ids=range(16)
    )
    assert reply.stored_tokens == CHUNK


def _l1_objects(server: ServerProcess) -> int:
    return int(server.http().get("/status").json()["l1"]["objects"])


def test_non_loopback_post_is_refused_without_a_token(
    open_server: ServerProcess, peer: Peer, engine: ShmKVCache
) -> None:
    _store_one(open_server, engine, 501)
    assert _l1_objects(open_server) >= 1
    status, _, body = peer.request("POST", open_server.http_port, "/clear-cache")
    assert status == 403
    assert json.loads(body) == {
        "status": "error",
        "reason": "POST /clear-cache is only allowed from loopback or with the admin token "
        "(--admin-token / LMCACHE_ADMIN_TOKEN)",
    }
    # A token means nothing when none is configured.
    assert peer.request("POST", open_server.http_port, "/clear-cache", f"Bearer {TOKEN}")[0] == 403
    # The rule is by method: every mutating method, on any path, known or not.
    for method, path in [("POST", "/clear-l2"), ("DELETE", "/clear-cache"),
                         ("PUT", "/status"), ("PATCH", "/nowhere")]:  # fmt: skip
        assert peer.request(method, open_server.http_port, path)[0] == 403, (method, path)
    assert _l1_objects(open_server) >= 1  # nothing was cleared
    assert "Cache cleared" not in open_server.log() and "L2 cleared" not in open_server.log()
    assert "HTTP POST /clear-cache from " in open_server.log()  # refusals are logged
    # A peer cannot pass for loopback: X-Forwarded-For counts only from a local proxy.
    assert _peer_forwarded(peer, open_server.http_port, "127.0.0.1") == 403
    # ... and a local proxy's client is not loopback.
    forwarded = open_server.http().post("/clear-cache", headers={"X-Forwarded-For": "10.9.8.7"})
    assert forwarded.status_code == 403
    assert "HTTP POST /clear-cache from 10.9.8.7 refused (403)" in open_server.log()
    # GET stays open to the network.
    status, _, body = peer.request("GET", open_server.http_port, "/healthcheck")
    assert (status, json.loads(body)) == (200, {"status": "healthy"})
    assert peer.request("GET", open_server.http_port, "/status")[0] == 200
    # Loopback needs no token: the quick start's curl.
    response = open_server.http().post("/clear-cache")
    assert response.status_code == 200 and response.json()["removed"] >= 1
    assert _l1_objects(open_server) == 0


def test_admin_token_opens_mutating_endpoints_to_the_network(
    guarded_server: ServerProcess, peer: Peer
) -> None:
    port = guarded_server.http_port
    status, _, body = peer.request("POST", port, "/clear-cache", f"Bearer {TOKEN}")
    assert (status, json.loads(body)["status"]) == (200, "ok")
    assert peer.request("POST", port, "/clear-l2", f"bearer {TOKEN}")[0] == 200
    for authorization in ("", f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", TOKEN, f"Basic {TOKEN}"):
        status, headers, body = peer.request("POST", port, "/clear-cache", authorization)
        assert status == 401, authorization
        assert {k.lower(): v for k, v in headers.items()}["www-authenticate"] == "Bearer"
        reason = json.loads(body)["reason"]
        assert "non-loopback" in reason and "--admin-token" in reason and TOKEN not in reason
    assert guarded_server.http().post("/clear-cache").status_code == 200  # loopback: no token


def test_loopback_posts_work_with_and_without_a_token(
    open_server: ServerProcess, guarded_server: ServerProcess
) -> None:
    for server in (open_server, guarded_server):
        http = server.http()
        assert http.post("/clear-cache").json()["status"] == "ok"
        assert http.post("/clear-l2").status_code == 200
        # A wrong token from loopback changes nothing: loopback is allowed as such.
        headers = {"Authorization": "Bearer wrong"}
        assert http.post("/clear-cache", headers=headers).status_code == 200


def test_browsers_on_other_sites_cannot_reach_admin_endpoints(
    open_server: ServerProcess, guarded_server: ServerProcess
) -> None:
    """A page on any site, opened in a browser on this host, is a loopback peer: the
    browser's own headers give it away (Origin, Sec-Fetch-Site), and a page that points its
    own name at 127.0.0.1 (DNS rebinding) sends that name as Host."""
    http, port = open_server.http(), open_server.http_port
    cross = [
        {"Origin": "http://evil.example"},
        {"Origin": "null"},
        {"Origin": f"http://localhost:{port + 1}"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
        {"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}"},
        {"Host": f"evil.example:{port}"},
    ]
    for headers in cross:
        response = http.post("/clear-cache", headers=headers)
        assert response.status_code == 403, headers
        assert "non-browser clients" in response.json()["reason"]
        assert http.put("/quota/x", headers=headers, json={"limit_gb": 1}).status_code == 403
    assert "refused (403): cross-site" in open_server.log()
    # The dashboard's own POST (same origin) and curl (no Origin) pass; GETs are open.
    same = {"Origin": f"http://127.0.0.1:{port}", "Sec-Fetch-Site": "same-origin"}
    assert http.post("/clear-cache", headers=same).status_code == 200
    assert http.post("/clear-cache", headers={"Host": f"localhost:{port}"}).status_code == 200
    assert http.post("/clear-cache", headers={"Host": f"[::1]:{port}"}).status_code == 200
    assert http.get("/status", headers={"Origin": "http://evil.example"}).status_code == 200
    # The admin token still opens a loopback request with another Host (a proxy's name) ...
    g = guarded_server.http()
    named = {"Host": "cache.internal:8080", "Authorization": f"Bearer {TOKEN}"}
    assert g.post("/clear-cache", headers=named).status_code == 200
    # ... but not a cross-site one.
    assert (
        g.post("/clear-cache", headers={**named, "Origin": "http://evil.example"}).status_code
        == 403
    )


def test_head_healthcheck_answers_like_get(open_server: ServerProcess) -> None:
    http = open_server.http()
    get, head = http.get("/healthcheck"), http.head("/healthcheck")
    assert get.status_code == head.status_code == 200
    assert head.content == b""
    assert head.headers["content-type"] == get.headers["content-type"]
    assert "/healthcheck" in http.get("/openapi.json").json()["paths"]


def test_status_and_log_hold_no_secret(guarded_server: ServerProcess, engine: ShmKVCache) -> None:
    _store_one(guarded_server, engine, 502)  # the write-behind to the dead Redis fails
    guarded_server.wait_log("L2 redis://127.0.0.1:1/0 failed (")
    status = guarded_server.http().get("/status")
    assert status.status_code == 200
    config = status.json()["config"]
    assert config["admin_token"] == "***"
    assert config["l2_adapter"][0]["url"] == "redis://***@127.0.0.1:1/0"
    for secret in (TOKEN, REDIS_SECRET):
        assert secret not in status.text
        assert secret not in guarded_server.log()
    assert ServerSettings().redacted()["admin_token"] is None  # not set: null, not "***"


def test_token_flag_env_and_help(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMCACHE_ADMIN_TOKEN", TOKEN)
    settings = ServerSettings()
    assert isinstance(settings.admin_token, SecretStr)
    assert settings.admin_token.get_secret_value() == TOKEN
    assert TOKEN not in repr(settings) and TOKEN not in str(settings.redacted())
    helped = subprocess.run(
        [sys.executable, "-m", "lmcache.cli", "server", "--help"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert "--admin-token" in helped.stdout and "LMCACHE_ADMIN_TOKEN" in helped.stdout
    assert TOKEN not in helped.stdout + helped.stderr


def test_loopback_and_bearer_rules() -> None:
    for host in ("127.0.0.1", "127.8.9.10", "::1", "[::1]", "::ffff:127.0.0.1"):
        assert is_loopback(host), host
    for other in (None, "", "10.0.0.1", "::ffff:10.0.0.1", "0.0.0.0", "::", "localhost", "x"):
        assert not is_loopback(other), other
    token = TOKEN.encode()
    assert bearer_matches(b"Bearer " + token, token)
    assert bearer_matches(b"BEARER  " + token + b" ", token)
    assert not bearer_matches(b"Bearer " + token[:-1], token)
    assert not bearer_matches(b"Bearer ", b"")  # an empty token never matches
    assert not bearer_matches(None, token)
    assert not bearer_matches(b"Bearer \xff", token)
