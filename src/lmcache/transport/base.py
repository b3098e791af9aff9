"""The client-side transport seam.

A `Transport` sends one request and returns its reply. `ZmqTransport` is the one the
package uses; `LMCacheClient` takes any object with these two methods, so a test can
hand it a small fake that answers from a function (like httpx's MockTransport).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from lmcache.protocol.messages import Reply, Request

Data = list[bytes] | list[memoryview]


class Transport(Protocol):
    def call(
        self, request: Request, timeout: float | None = None, data: Sequence[Any] = ()
    ) -> tuple[Reply, Data]:
        """Send ``request`` (and raw ``data`` frames); return the reply and its data frames."""

    def close(self) -> None: ...
