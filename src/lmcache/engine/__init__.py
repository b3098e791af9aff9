"""Engines as the server sees them: registrations and how their KV memory is reached."""
