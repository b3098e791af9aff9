"""Integrations of serving engines with the LMCache server."""
