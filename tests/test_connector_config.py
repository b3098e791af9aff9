"""The connector's settings from ``kv_connector_extra_config`` (no vLLM needed)."""

from __future__ import annotations

import re

import pytest

from lmcache.errors import ConfigError
from lmcache.integration.vllm.config import ConnectorConfig


def test_defaults_and_typed_overrides() -> None:
    assert ConnectorConfig.from_extra_config(None) == ConnectorConfig()
    config = ConnectorConfig.from_extra_config(
        {
            "lmcache.mp.port": "6000",
            "lmcache.mp.async_store": "false",
            "lmcache.mp.copy_threads": 2,
            "lmcache.mp.rpc_timeout": "2.5",
        }
    )
    assert (config.port, config.async_store, config.copy_threads, config.rpc_timeout) == (
        6000, False, 2, 2.5,
    )  # fmt: skip
    assert ConnectorConfig.from_extra_config({"lmcache.mp.async_store": True}).async_store
    for raw, value in [(True, "true"), (False, "false"), ("AUTO", "auto"), (" True ", "true")]:
        config = ConnectorConfig.from_extra_config({"lmcache.mp.layerwise_load": raw})
        assert config.layerwise_load == value, raw


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("lmcache.mp.async_store", "maybe", "must be a bool"),
        ("lmcache.mp.copy_threads", "-1", "copy_threads must be 0 (auto) to 64"),
        ("lmcache.mp.port", "x", "must be a int"),
        ("lmcache.mp.mp_transfer_mode", "gpu", "mp_transfer_mode must be one of"),
        ("lmcache.mp.layerwise_load", "maybe", "layerwise_load must be one of auto, true, false"),
    ],
)
def test_bad_values_name_the_key(key: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        ConnectorConfig.from_extra_config({key: value})


def test_unknown_keys_are_logged_not_fatal(caplog: pytest.LogCaptureFixture) -> None:
    ConnectorConfig.from_extra_config({"lmcache.mp.nope": 1, "other.key": 2})
    assert "ignoring unknown connector settings: lmcache.mp.nope" in caplog.text
