"""Encoding and decoding of frames, with a typed error for anything malformed."""

from __future__ import annotations

import msgspec

from lmcache.protocol.messages import (
    REQUEST_OPS,
    Envelope,
    ErrorCode,
    ErrorReply,
    Reply,
    Request,
)

_encoder = msgspec.msgpack.Encoder()
_request_decoder: msgspec.msgpack.Decoder[Request] = msgspec.msgpack.Decoder(Request)
_reply_decoder: msgspec.msgpack.Decoder[Reply] = msgspec.msgpack.Decoder(Reply)
_envelope_decoder = msgspec.msgpack.Decoder(Envelope)

MAX_ERROR_MESSAGE = 4096


def encode(message: msgspec.Struct) -> bytes:
    return _encoder.encode(message)


def decode_request(frame: bytes) -> Request | ErrorReply:
    """Decode a request, or explain in an `ErrorReply` (echoing the id) why not."""
    try:
        return _request_decoder.decode(frame)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        try:
            env = _envelope_decoder.decode(frame)
        except (msgspec.DecodeError, msgspec.ValidationError):
            env = Envelope()
        if env.op and env.op not in REQUEST_OPS:
            message = f"unknown request type {env.op[:100]!r}"
        else:
            message = f"malformed {env.op or 'request'}: {exc}"
        return error_reply(env.id, ErrorCode.BAD_REQUEST, message)


def decode_reply(frame: bytes) -> Reply:
    return _reply_decoder.decode(frame)


def error_reply(request_id: int, code: ErrorCode, message: str) -> ErrorReply:
    return ErrorReply(id=request_id, code=code.value, message=message[:MAX_ERROR_MESSAGE])
