"""The deployment kit under deploy/: Prometheus alert rules (promtool check and unit tests
that fire each alert), our Grafana dashboard (generated, fresh, well formed), every metric
either of them queries exposed by a real server's /metrics after real traffic, and the
Kubernetes manifests and systemd unit parsed and checked for what the server needs
(/dev/shm shared with the engines, probes on /healthcheck, the admin token from a Secret).
kubectl is not available here: the manifests are checked as YAML (PyYAML) against the
fields this kit relies on, not against the Kubernetes API schema."""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from lmcache.engine.shm_kv import ShmKVCache

from .conftest import CHUNK, MODEL, engine, fill_random, lookup_hit, register, start_server

__all__ = ["engine"]
ROOT = Path(__file__).parents[1]
DEPLOY = ROOT / "deploy"
RULES = DEPLOY / "prometheus" / "lmcache-alerts.yml"
RULE_TESTS = DEPLOY / "prometheus" / "lmcache-alerts.test.yml"
DASHBOARD = DEPLOY / "grafana" / "lmcache-dashboard.json"
K8S = DEPLOY / "kubernetes" / "lmcache.yaml"
UNIT = DEPLOY / "systemd" / "lmcache.service"
NOT_OURS = {"up"}  # Prometheus' own series


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("LMCACHE_REQUIRE_PROMTOOL") == "1":
            pytest.fail("promtool is not installed (apt package prometheus)")
        pytest.skip("promtool is not installed (apt package prometheus)")
    return found


def dashboard_exprs() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"] for p in panels for t in p.get("targets", [])]


def rule_exprs() -> dict[str, str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {r["alert"]: r["expr"] for g in groups for r in g["rules"]}


def metric_names(exprs: list[str]) -> set[str]:
    """Metric names in PromQL expressions (ours start with lmcache_; `up` is Prometheus')."""
    names = set()
    for expr in exprs:
        names |= set(re.findall(r"\b(lmcache_[a-z0-9_]+)", expr))
    return {re.sub(r"_bucket$", "", n) for n in names}


# ----- Prometheus rules --------------------------------------------------------------------


def test_promtool_checks_the_rules() -> None:
    out = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True,
                         text=True, check=False)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(rule_exprs())} rules found" in out.stdout


def test_promtool_unit_tests_fire_every_alert() -> None:
    out = subprocess.run([promtool(), "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent,
                         capture_output=True, text=True, check=False)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fired = {c["alertname"] for t in tests for c in t["alert_rule_test"] if c["exp_alerts"]}
    quiet = {c["alertname"] for t in tests for c in t["alert_rule_test"] if not c["exp_alerts"]}
    assert fired == set(rule_exprs()), "every alert needs a test in which it fires"
    assert len(quiet) >= 4  # and most a case in which it does not


def test_required_alerts_are_there() -> None:
    rules = rule_exprs()
    for alert in ("LMCacheServerDown", "LMCacheHitRateCollapse", "LMCacheL2Degraded",
                  "LMCacheStoresOutOfSpace", "LMCacheL1FullOfLockedObjects"):  # fmt: skip
        assert alert in rules


# ----- Grafana ----------------------------------------------------------------------------


def test_dashboard_json_is_generated_and_well_formed() -> None:
    check = subprocess.run([sys.executable, str(DEPLOY / "grafana" / "generate.py"), "--check"],
                           capture_output=True, text=True, check=False)  # fmt: skip
    assert check.returncode == 0, check.stderr
    board = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)) > 20
    for p in board["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24 and g["w"] > 0 and g["h"] > 0, p["title"]
        if p["type"] != "row":
            assert p["targets"] and all(t["expr"] for t in p["targets"]), p["title"]
            assert p["datasource"]["uid"] == "${datasource}"
    names = {v["name"] for v in board["templating"]["list"]}
    assert names == {"datasource", "instance"}
    # ours: only our own metric names (upstream's dashboard is a separate thing)
    assert not any("lmcache_mp_" in e for e in dashboard_exprs())


# ----- every queried metric exists on a real server -------------------------------------------


@pytest.fixture(scope="module")
def metrics_text(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """/metrics of a real server with an fs L2, after a store and an L1 and an L2 hit."""
    kv = ShmKVCache(num_layers=4, num_blocks=64, block_size=16, block_bytes=2048, planes=2)
    l2 = tmp_path_factory.mktemp("l2")
    server = start_server("--l2-adapter", json.dumps({"type": "fs", "path": str(l2)}))
    try:
        client, http = server.client(), server.http()
        register(client, kv, 1)
        fill_random(kv, 5)
        tokens = np.arange(3 * CHUNK, dtype=np.uint32) + 9_000
        client.store("s", 1, tokens, start=0, end=3 * CHUNK, block_ids=range(48))
        for request_id in ("from-l1", "from-l2"):
            deadline = time.monotonic() + 10  # the write-behind copies to L2 within ms
            while http.get("/status").json()["l2_adapters"][0]["stored_objects"] < 3:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            assert lookup_hit(client, request_id, tokens, **MODEL) == 3 * CHUNK
            client.retrieve(request_id, 1, tokens, start=0, end=3 * CHUNK, block_ids=range(48))
            client.end_session(request_id)
            http.post("/clear-cache")
        yield http.get("/metrics").text
    finally:
        server.stop()
        kv.close()


def test_every_metric_the_kit_queries_is_exposed(metrics_text: str) -> None:
    exposed = {
        re.sub(r"(_bucket|_sum|_count)$", "", line.split("{")[0].split(" ")[0])
        for line in metrics_text.splitlines()
        if line and not line.startswith("#")
    }
    queried = metric_names(dashboard_exprs()) | metric_names(list(rule_exprs().values()))
    assert len(queried) > 15
    missing = sorted(queried - exposed - NOT_OURS)
    assert not missing, f"queried by deploy/ but not on /metrics: {missing}"


# ----- Kubernetes -----------------------------------------------------------------------------


def _k8s() -> dict[str, dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(K8S.read_text()) if d]
    for d in docs:
        assert {"apiVersion", "kind", "metadata", "spec"} <= set(d), d.get("kind")
        assert d["metadata"]["name"] and d["metadata"]["namespace"]
    return {d["kind"]: d for d in docs}


def test_daemonset_shares_shm_and_probes_healthcheck() -> None:
    ds = _k8s()["DaemonSet"]
    assert ds["apiVersion"] == "apps/v1"
    pod = ds["spec"]["template"]["spec"]
    labels = ds["spec"]["template"]["metadata"]["labels"]
    assert ds["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pod["hostIPC"] is True
    assert pod["hostPID"] is True  # dead engines forgotten at once (see test_containers.py)
    assert pod["securityContext"]["runAsUser"]  # engines must run as this uid
    (c,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"zmq": 5555, "http": 8080}
    args = dict(a.removeprefix("--").split("=", 1) for a in c["args"])
    assert args["port"] == "5555" and args["http-port"] == "8080"
    assert args["http-host"] == "0.0.0.0"  # probes and Prometheus come from outside the pod
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] == "/healthcheck" and get["port"] in ports, probe
    env = {e["name"]: e for e in c["env"]}
    secret = env["LMCACHE_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert secret["name"] and secret["key"] and "value" not in env["LMCACHE_ADMIN_TOKEN"]
    assert c["resources"]["limits"]["memory"] and c["resources"]["requests"]["cpu"]
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["shm"] == "/dev/shm" and volumes["shm"]["hostPath"]["path"] == "/dev/shm"
    assert set(mounts) <= set(volumes)
    assert pod["terminationGracePeriodSeconds"] >= 120  # a stop may wait for a pre-fault


def test_daemonset_flags_are_valid_server_flags() -> None:
    c = _k8s()["DaemonSet"]["spec"]["template"]["spec"]["containers"][0]
    assert c["command"] == ["lmcache", "server"]
    help_text = subprocess.run([sys.executable, "-m", "lmcache.cli", "server", "--help"],
                               capture_output=True, text=True, check=True).stdout  # fmt: skip
    for arg in c["args"]:
        assert arg.split("=")[0] in help_text, arg


def test_service_targets_the_daemonsets_ports() -> None:
    kinds = _k8s()
    svc, ds = kinds["Service"], kinds["DaemonSet"]
    labels = ds["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    names = {p["name"] for p in ds["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= names
    assert svc["spec"]["internalTrafficPolicy"] == "Local"  # each node's own server


# ----- systemd --------------------------------------------------------------------------------


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=True, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    return parser


def test_systemd_unit_keeps_shared_memory_working() -> None:
    service = _unit()["Service"]
    assert service["RemoveIPC"] == "no" and service["PrivateDevices"] == "no"
    assert service["PrivateIPC"] == "no"
    assert "/dev/shm" in service["ReadWritePaths"].split()
    assert "AF_UNIX" in service["RestrictAddressFamilies"]  # the local endpoint
    assert service["ExecStart"].split()[1:2] == ["server"]
    assert service["KillSignal"] == "SIGTERM" and service["User"]
    assert _unit()["Install"]["WantedBy"] == "multi-user.target"


def test_systemd_analyze_accepts_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    exe = shutil.which("true") or "/bin/true"  # the installed path does not exist here
    unit = tmp_path / "lmcache.service"
    unit.write_text(UNIT.read_text().replace("/opt/lmcache/bin/lmcache", exe))
    out = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                         check=False)  # fmt: skip
    assert out.returncode == 0 and not out.stderr.strip(), out.stderr
