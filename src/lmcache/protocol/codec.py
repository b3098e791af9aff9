"""Encoding and decoding of frames, with a typed error for anything malformed."""

from __future__ import annotations

import msgspec

from lmcache.protocol.messages import (
    REQUEST_OPS,
    ErrorCode,
    ErrorReply,
    Reply,
    Request,
)

_encoder = msgspec.msgpack.Encoder()
_request_decoder: msgspec.msgpack.Decoder[Request] = msgspec.msgpack.Decoder(Request)
_reply_decoder: msgspec.msgpack.Decoder[Reply] = msgspec.msgpack.Decoder(Reply)

MAX_ERROR_MESSAGE = 4096


def encode(message: msgspec.Struct) -> bytes:
    return _encoder.encode(message)


def decode_request(frame: bytes) -> Request | ErrorReply:
    """Decode a request, or explain in an `ErrorReply` (echoing the id) why not."""
    try:
        return _request_decoder.decode(frame)
    except Exception as exc:  # DecodeError, ValidationError, bad UTF-8, deep nesting...
        request_id, op = _envelope(frame)
        if op and op not in REQUEST_OPS:
            message = f"unknown request type {op[:100]!r}"
        else:
            message = f"malformed {op or 'request'}: {exc}"
        return error_reply(request_id, ErrorCode.BAD_REQUEST, message)


class _Envelope(msgspec.Struct):
    """Lenient view of a broken frame: other fields are skipped unread (even bad UTF-8)."""

    id: object = None
    op: msgspec.Raw = msgspec.Raw()


_envelope_decoder = msgspec.msgpack.Decoder(_Envelope)


def _envelope(frame: bytes) -> tuple[int, str]:
    """Best effort: the id (to echo) and op of a frame that failed to decode."""
    request_id: object = None
    op: object = None
    try:  # skips other fields unread: survives bad UTF-8 or odd values elsewhere
        env = _envelope_decoder.decode(frame)
        request_id = env.id
        op = msgspec.msgpack.decode(env.op) if len(env.op) else None
    except Exception:
        try:  # non-string keys defeat the struct decoder, not the untyped one
            data = msgspec.msgpack.decode(frame)
            if isinstance(data, dict):
                request_id, op = data.get("id"), data.get("op")
        except Exception:  # not a map, or nested beyond reason
            pass
    if not (type(request_id) is int and -(2**63) <= request_id < 2**64):
        request_id = -1
    return int(request_id), (op if isinstance(op, str) else "")


def decode_reply(frame: bytes) -> Reply:
    return _reply_decoder.decode(frame)


def error_reply(request_id: int, code: ErrorCode, message: str) -> ErrorReply:
    return ErrorReply(id=request_id, code=code.value, message=message[:MAX_ERROR_MESSAGE])
