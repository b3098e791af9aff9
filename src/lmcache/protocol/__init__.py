"""The engine-facing wire protocol: typed msgspec messages, never pickle."""
