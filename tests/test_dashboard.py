"""The dashboard at GET / in a real headless Chromium (Debian's `chromium`, driven by
Playwright for Python over the system binary: no downloaded browser). A real server, a
real client storing and retrieving over ZMQ and shared memory; the page must load without
console errors, its numbers must follow the traffic without a reload, and a screenshot
is written under pytest's tmp dir. Skipped without chromium or playwright unless
LMCACHE_REQUIRE_BROWSER=1 (CI), where that fails.

The HTTP-only checks (files, headers, package data) need no browser."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lmcache.engine.shm_kv import ShmKVCache
from lmcache.http.dashboard import load_static

from .conftest import (
    CHUNK,
    MODEL,
    ServerProcess,
    engine,
    fill_random,
    register,
    start_server,
    unique_tokens,
)

__all__ = ["engine"]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


def _browser_missing() -> str | None:
    if not os.access(CHROMIUM, os.X_OK):
        return f"{CHROMIUM} is not installed (apt package chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright; the test extras)"
    return None


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A Chromium context of its own (temporary profile), closed at the end."""
    missing = _browser_missing()
    if missing is not None:
        if os.environ.get("LMCACHE_REQUIRE_BROWSER") == "1":
            pytest.fail(missing)
        pytest.skip(missing)
    from playwright.sync_api import sync_playwright

    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 1100},
        )  # fmt: skip
        try:
            yield context
        finally:
            context.close()


@pytest.fixture(scope="module")
def dash_server() -> Iterator[ServerProcess]:
    s = start_server()
    yield s
    s.stop()


def _console(page: Any) -> list[str]:
    """Collects console errors and uncaught page errors."""
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
    return errors


def _wait_text(page: Any, element_id: str, text: str) -> None:
    """Until element ``element_id`` shows ``text`` (a function, not a string: the page's
    content security policy forbids eval, which Playwright uses for string predicates)."""
    page.wait_for_function(
        "([id, text]) => document.getElementById(id).textContent === text",
        arg=[element_id, text], timeout=15_000,
    )  # fmt: skip


def _number(page: Any, element_id: str) -> int:
    return int(page.text_content(f"#{element_id}").replace(",", "") or "0")


def test_page_and_files_are_served_with_a_strict_policy(dash_server: ServerProcess) -> None:
    with dash_server.http() as http:
        page = http.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert '<script src="/dashboard/dashboard.js"' in page.text
        for name, kind in (("dashboard.js", "javascript"), ("dashboard.css", "css")):
            r = http.get(f"/dashboard/{name}")
            assert r.status_code == 200 and kind in r.headers["content-type"]
        assert http.get("/dashboard/../settings.py").status_code == 404
        assert http.get("/dashboard/nothing.js").status_code == 404
        # the quick start's routes are unchanged
        assert http.get("/healthcheck").json() == {"status": "healthy"}
        assert "traffic" in http.get("/status").json()


def test_static_files_are_package_data() -> None:
    """pip install carries the files: pyproject's package data names them."""
    files = load_static()
    assert all(files.values())
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert '"http/static/*"' in pyproject


def test_dashboard_follows_a_store_and_a_retrieve(
    browser: Any, dash_server: ServerProcess, engine: ShmKVCache, tmp_path: Path
) -> None:
    page = browser.new_page()
    errors = _console(page)
    page.goto(dash_server.url + "/")
    _wait_text(page, "health", "healthy")
    assert _number(page, "stored-tokens") == 0 and _number(page, "retrieved-tokens") == 0
    assert page.text_content("#engine-count") == "0"

    client = dash_server.client()
    register(client, engine, 7)
    fill_random(engine, 3)
    tokens = unique_tokens(3 * CHUNK)
    assert client.store("s", 7, tokens, start=0, end=3 * CHUNK, block_ids=range(48)).stored_tokens
    _wait_text(page, "stored-tokens", "768")
    assert client.lookup("r", tokens, **MODEL) == 3 * CHUNK
    client.retrieve("r", 7, tokens, start=0, end=3 * CHUNK, block_ids=range(16, 64))
    client.end_session("r")
    _wait_text(page, "retrieved-tokens", "768")
    _wait_text(page, "hit-rate", "100.0 %")
    assert page.text_content("#engine-count") == "1"
    assert "shm" in page.text_content("#engines")  # engine_driven: its segments mapped
    assert _number(page, "l1-objects") == 3
    assert page.text_content("#l1-used") == "384.0 KiB"
    # the rate over the poll that saw the store was above zero: drawn on the chart
    rates = page.evaluate("samples.map((p) => p.storeTps)")
    assert max(rates) > 0
    page.wait_for_timeout(1200)  # one more poll: the chart has a few points
    shot = tmp_path / "dashboard.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")
    assert not errors, errors
    page.close()


def test_clear_button_works_from_loopback(
    browser: Any, dash_server: ServerProcess, engine: ShmKVCache
) -> None:
    client = dash_server.client()
    register(client, engine, 8)
    client.store("c", 8, unique_tokens(CHUNK), start=0, end=CHUNK, block_ids=range(16))
    page = browser.new_page()
    errors = _console(page)
    page.on("dialog", lambda d: d.accept())
    page.goto(dash_server.url + "/")
    page.click("#clear-l1")
    page.wait_for_selector("#action-result.ok")
    assert "removed from L1" in page.text_content("#action-result")
    assert dash_server.status()["l1"]["objects"] == 0
    assert not errors, errors
    page.close()


def _lan_address() -> str | None:
    """This host's address on its first non-loopback interface (None: there is none)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: only picks the route's address
            address = str(s.getsockname()[0])
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_refused_clear_is_shown(browser: Any, tmp_path: Path) -> None:
    """Through the host's LAN address the page's peer is not loopback: without the admin
    token the clear is refused (403), with a wrong one 401, and the page says so."""
    lan = _lan_address()
    if lan is None:
        pytest.skip("no non-loopback IPv4 address on this host")
    s = start_server("--http-host", "0.0.0.0", env={"LMCACHE_ADMIN_TOKEN": "t" * 32})
    try:
        page = browser.new_page()
        page.on("dialog", lambda d: d.accept())
        page.goto(f"http://{lan}:{s.http_port}/")
        page.click("#clear-l1")
        page.wait_for_selector("#action-result.bad")
        text = page.text_content("#action-result")
        assert text.startswith("Refused (401):") and "token is missing or wrong" in text
        page.fill("#token", "t" * 32)
        page.click("#clear-l1")
        page.wait_for_selector("#action-result.ok")
        assert "t" * 32 not in page.content()  # the token is in no element's text
        page.screenshot(path=str(tmp_path / "refused.png"))
        page.close()
    finally:
        s.stop()
    assert "t" * 32 not in s.log()


def test_page_shows_lost_connection(browser: Any) -> None:
    s = start_server()
    page = browser.new_page()
    try:
        page.goto(s.url + "/")
        _wait_text(page, "health", "healthy")
        s.stop()
        _wait_text(page, "health", "unreachable")
        assert "cannot reach the server" in page.text_content("#conn")
    finally:
        page.close()
        s.stop()


def test_browser_is_required_in_ci() -> None:
    """The skip above is for developers' machines only: CI sets LMCACHE_REQUIRE_BROWSER."""
    ci = (Path(__file__).parents[1] / ".ci" / "run").read_text()
    assert "LMCACHE_REQUIRE_BROWSER=1" in ci
