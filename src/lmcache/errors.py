"""Every exception that LMCache raises on purpose.

    LMCacheError
     ├── ConfigError            invalid settings; raised at startup, names the field
     ├── ProtocolMismatchError  the server speaks another protocol version (client side)
     ├── ServerError            the server answered with a typed error reply
     │    ├── BadRequestError       malformed frame, unknown op, invalid field values
     │    ├── UnknownEngineError    the instance id is not registered (re-register)
     │    ├── CacheMissError        retrieve of chunks that are not (or no longer) cached
     │    ├── NoSpaceError          L1 is full of locked objects
     │    ├── TransferError         a copy failed or was interrupted (e.g. by a clear)
     │    └── ForbiddenError        this peer may not do that (untrusted, or not the owner)
     ├── ServerUnavailableError  no reply in time: server down, restarting or overloaded
     └── QuotaError             a /quota request refused (``status``: its HTTP status)

`ServerError.code` is the wire error code (see `lmcache.protocol.messages.ErrorCode`),
so a client can map any reply to exactly one class with `error_from_code`.
"""

from __future__ import annotations


class LMCacheError(Exception):
    """Base class of all LMCache errors."""


class ConfigError(LMCacheError):
    """A setting is invalid."""


class ProtocolMismatchError(LMCacheError):
    """The server speaks another wire protocol version: upgrade one side."""


class ServerUnavailableError(LMCacheError):
    """The server did not answer in time."""


class QuotaError(LMCacheError):
    """A quota request that cannot be served; ``status`` is its HTTP status."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class ServerError(LMCacheError):
    """The server answered a request with an error reply."""

    code = "internal"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class BadRequestError(ServerError):
    code = "bad_request"


class UnknownEngineError(ServerError):
    code = "unknown_engine"


class CacheMissError(ServerError):
    code = "miss"


class NoSpaceError(ServerError):
    code = "no_space"


class TransferError(ServerError):
    code = "transfer_failed"


class ForbiddenError(ServerError):
    code = "forbidden"


_BY_CODE: dict[str, type[ServerError]] = {
    cls.code: cls
    for cls in (
        BadRequestError,
        UnknownEngineError,
        CacheMissError,
        NoSpaceError,
        TransferError,
        ForbiddenError,
    )
}


def error_from_code(code: str, message: str) -> ServerError:
    """Build the exception that matches a wire error code (unknown codes → `ServerError`)."""
    cls = _BY_CODE.get(code, ServerError)
    return cls(message, code)
