"""Transports: how request frames get from an engine to the handlers and back."""
