"""Secrets masked everywhere and repeated lines limited, as units: `lmcache.redact` (URLs,
free text, nested data), the settings' redacted view, and the `LogGuard` that every log
handler sits behind (credentials masked, a line repeated too often suppressed, then
counted). test_http_security.py checks the same on a real server's /status and log.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from pydantic import SecretStr

from lmcache.logs import FORMAT, LogGuard, ensure_logging, setup_logging
from lmcache.redact import mask_text, mask_url, redact
from lmcache.settings import ServerSettings

TOKEN = "adm-" + "7f3a9c2e5b1d4086" * 2


# ----- redact.py ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("redis://user:pw@host:6379/0", "redis://***@host:6379/0"),
        ("redis://:pw@host/0", "redis://***@host/0"),
        ("rediss://user@host/0", "rediss://***@host/0"),
        ("redis://:p@ss@host/0", "redis://***@host/0"),  # an unescaped "@" in the password
        ("redis+cluster://u:p@h1:1,h2:2", "redis+cluster://***@h1:1,h2:2"),
        ("redis://host/0?password=x", "redis://host/0?password=***"),
        ("redis://host/0?db=1&PassWord=x&y=2", "redis://host/0?db=1&PassWord=***&y=2"),
        ("https://h/p?passwd=a&pwd=b&token=c&secret=d", "https://h/p?passwd=***&pwd=***&token=***&secret=***"),
        ("https://h/p?Key=a&AUTH=b&api_key=c&access_token=d#frag", "https://h/p?Key=***&AUTH=***&api_key=***&access_token=***#frag"),
        ("https://h/p?keyspace=a&author=b&tokens=4", "https://h/p?keyspace=a&author=b&tokens=4"),
        ("redis://host:6379/0", "redis://host:6379/0"),
        ("/data/kv", "/data/kv"),
        ("mail a@b.example, no URL", "mail a@b.example, no URL"),
        ("see redis://u:pw@h:1/0 and https://t@x/?token=y now",
         "see redis://***@h:1/0 and https://***@x/?token=*** now"),
    ],
)  # fmt: skip
def test_mask_url(url: str, masked: str) -> None:
    assert mask_url(url) == masked
    assert mask_url(masked) == masked  # idempotent


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("connecting with password=hunter2;", "connecting with password=***;"),
        ("{'url': 'redis://:pw@h/0', 'token': 'abc d'}",
         "{'url': 'redis://***@h/0', 'token': '***'}"),
        ('{"admin_token": "abc", "n": 1}', '{"admin_token": "***", "n": 1}'),
        ("Authorization: Bearer abc.def-123", "Authorization: Bearer ***"),
        ("Stored 256 tokens in 0.012 seconds", "Stored 256 tokens in 0.012 seconds"),
        ("max_tokens=5 secret: x", "max_tokens=5 secret: ***"),
    ],
)  # fmt: skip
def test_mask_text(text: str, masked: str) -> None:
    assert mask_text(text) == masked


def test_redact_masks_nested_data() -> None:
    data = {
        "l2_adapter": [
            {"type": "redis", "url": "redis://u:pw@h/0?password=x", "key_prefix": "lmcache:"},
            {"type": "x", "options": {"auth": {"Password": "p", "user": "u"}, "api_secret": 1}},
        ],
        "admin_token": SecretStr("t"),
        "unset_token": None,
        "max_tokens": 7,
        "nested": ({"client_secret": ["a", "b"]}, "redis://:p@h"),
    }
    assert redact(data) == {
        "l2_adapter": [
            {"type": "redis", "url": "redis://***@h/0?password=***", "key_prefix": "lmcache:"},
            {
                "type": "x",
                "options": {"auth": {"Password": "***", "user": "u"}, "api_secret": "***"},
            },
        ],
        "admin_token": "***",
        "unset_token": None,
        "max_tokens": 7,
        "nested": [{"client_secret": "***"}, "redis://***@h"],
    }
    assert data["admin_token"] == SecretStr("t")  # a copy: the input is untouched


def test_settings_redacted_masks_every_l2_secret() -> None:
    settings = ServerSettings(
        admin_token=TOKEN,
        l2_adapter=[{"type": "redis", "url": "redis://u:pw@h/0?password=x"}],
    )
    shown = settings.redacted()
    assert shown["admin_token"] == "***"
    assert shown["l2_adapter"] == [{"type": "redis", "url": "redis://***@h/0?password=***"}]
    assert settings.l2_adapter[0]["url"] == "redis://u:pw@h/0?password=x"  # only the view


# ----- the log guard -----------------------------------------------------------------------


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter(FORMAT))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def guarded_log() -> Iterator[tuple[logging.Logger, ListHandler, list[float]]]:
    """A private logger with a list handler behind a `LogGuard` on a clock the test moves."""
    clock = [1000.0]
    handler = ListHandler()
    LogGuard(clock=lambda: clock[0]).attach(handler)
    logger = logging.getLogger(f"lmcache-test-guard-{random.randrange(1 << 30)}")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger, handler, clock
    logger.handlers.clear()


def test_log_guard_masks_credentials(
    guarded_log: tuple[logging.Logger, ListHandler, list[float]],
) -> None:
    logger, handler, _ = guarded_log
    logger.info("L2 at %s", "redis://user:pw@h:6379/0")
    logger.warning("config %s", {"url": "valkey://h/0?password=pw", "password": "pw2"})
    logger.info("Stored %d tokens in %.3f seconds", 256, 0.5)
    try:
        raise ConnectionError("cannot reach rediss://:pw3@h:6380/0")
    except ConnectionError:
        logger.exception("adapter failed")
    text = "\n".join(handler.lines)
    assert handler.lines[0] == "LMCache INFO: L2 at redis://***@h:6379/0"
    assert "valkey://h/0?password=***" in handler.lines[1] and "'password': '***'" in text
    assert handler.lines[2] == "LMCache INFO: Stored 256 tokens in 0.500 seconds"
    assert "rediss://***@h:6380/0" in text and "Traceback" in text
    for secret in ("pw@", "pw2", "pw3"):
        assert secret not in text


def test_log_guard_limits_repeated_lines(
    guarded_log: tuple[logging.Logger, ListHandler, list[float]],
) -> None:
    logger, handler, clock = guarded_log
    for i in range(25):
        logger.warning("bad request %d from %s", i, "10.0.0.2")
    logger.info("bad request %d from %s", 0, "x")  # another level: another line
    logger.warning("another line")
    assert len(handler.lines) == 22
    assert handler.lines[19] == "LMCache WARNING: bad request 19 from 10.0.0.2"
    clock[0] += 9.9
    logger.warning("bad request %d from %s", 99, "x")  # same window: still suppressed
    assert len(handler.lines) == 22
    clock[0] += 0.2  # the window rolled over: one summary, then the line
    logger.warning("bad request %d from %s", 100, "y")
    assert handler.lines[22:] == [
        "LMCache WARNING: suppressed 6 repeats of: bad request %d from %s",
        "LMCache WARNING: bad request 100 from y",
    ]
    # A new window: 20 more pass (one already did).
    for i in range(25):
        logger.warning("bad request %d from %s", i, "z")
    assert len(handler.lines) == 24 + 19
    # Another line's roll-over reports the suppressed ones even if they never come back.
    clock[0] += 10.5
    logger.info("something else")
    assert handler.lines[-2:] == [
        "LMCache WARNING: suppressed 6 repeats of: bad request %d from %s",
        "LMCache INFO: something else",
    ]


def test_log_guard_counts_bare_placeholder_lines_by_their_text(
    guarded_log: tuple[logging.Logger, ListHandler, list[float]],
) -> None:
    logger, handler, _ = guarded_log
    for i in range(30):  # e.g. runtime's logger.warning("%s", line): distinct lines
        logger.warning("%s", f"Unregistered GPU ID {i}: its process is gone")
    for _ in range(30):
        logger.warning("%s", "the same line")
    assert len(handler.lines) == 30 + 20


def _saved_loggers(names: tuple[str, ...]) -> Callable[[], None]:
    saved: dict[str, Any] = {
        n: (logging.getLogger(n).handlers[:], logging.getLogger(n).level,
            logging.getLogger(n).propagate)
        for n in names
    }  # fmt: skip

    def restore() -> None:
        for n, (handlers, level, propagate) in saved.items():
            logger = logging.getLogger(n)
            logger.handlers[:], logger.level, logger.propagate = handlers, level, propagate

    return restore


def test_setup_and_ensure_logging_install_the_guard() -> None:
    restore = _saved_loggers(("lmcache", "uvicorn", "uvicorn.error"))
    try:
        logging.getLogger("lmcache").handlers.clear()
        ensure_logging()
        (handler,) = logging.getLogger("lmcache").handlers
        assert any(isinstance(f, LogGuard) for f in handler.filters)
        setup_logging("INFO")
        for name in ("lmcache", "uvicorn", "uvicorn.error"):
            (handler,) = logging.getLogger(name).handlers
            assert any(isinstance(f, LogGuard) for f in handler.filters)
    finally:
        restore()
