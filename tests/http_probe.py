"""Probing an HTTP app in process, as a given client address would: the admin rule
(loopback or the bearer token) is decided by the peer's address, which only the ASGI
transport lets a test choose. `IdleServer` is the server view such an app needs when the
test is about routing and access, not about what a real server answers."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx


def ask(app: Any, peer: str, *requests: tuple[str, str, dict[str, Any]]) -> list[int]:
    """Status codes of ``requests`` ((method, path, httpx keyword arguments), in order)
    sent to ``app`` from address ``peer``."""
    transport = httpx.ASGITransport(app=app, client=(peer, 4242))

    async def run() -> list[int]:
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
            return [(await http.request(m, p, **kw)).status_code for m, p, kw in requests]

    return asyncio.run(run())


class IdleServer:
    """A server view that is ready, healthy and empty: clears remove nothing."""

    ready = True

    def health(self) -> list[str]:
        return []

    def degraded(self) -> list[str]:
        return []

    def clear(self) -> int:
        return 0

    def clear_l2(self) -> int:
        return 0

    def status(self) -> dict[str, Any]:
        return {}
