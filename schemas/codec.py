"""The one place payloads are encoded and decoded (JSON by default, msgpack by header)."""

from __future__ import annotations

import re
from functools import cache
from typing import Any, TypeVar, overload

import msgspec

from .api import ErrorBody, ErrorCode, ErrorReply

T = TypeVar("T")

MSGPACK = "application/msgpack"
CONTENT_TYPE_HEADER = "Content-Type"

_PATH_RE = re.compile(r" - at `(?P<path>[^`]*)`$")


class SchemaError(ValueError):
    """A payload that does not match the wire contract. `path` points at the offending field."""

    code = ErrorCode.INVALID_REQUEST

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(f"{message} (at {path})" if path else message)
        self.message = message
        self.path = path


def _schema_error(exc: msgspec.ValidationError) -> SchemaError:
    """msgspec says "... - at `$.a[0].b`"; split that into message and path."""
    text = str(exc)
    m = _PATH_RE.search(text)
    if m:
        return SchemaError(text[: m.start()], m.group("path"))
    return SchemaError(text, "$")


@cache
def _json_decoder(type_: Any) -> msgspec.json.Decoder[Any]:
    return msgspec.json.Decoder(type_)


@cache
def _msgpack_decoder(type_: Any) -> msgspec.msgpack.Decoder[Any]:
    return msgspec.msgpack.Decoder(type_)


_json_encoder = msgspec.json.Encoder()
_msgpack_encoder = msgspec.msgpack.Encoder()


def is_msgpack(content_type: str | None) -> bool:
    return content_type is not None and content_type.split(";")[0].strip().lower() == MSGPACK


def content_type_of(headers: dict[str, str] | None) -> str | None:
    if not headers:
        return None
    for key, value in headers.items():
        if key.lower() == "content-type":
            return value
    return None


@overload
def decode(data: bytes | bytearray | memoryview, type_: type[T], content_type: str | None = None) -> T: ...
@overload
def decode(data: bytes | bytearray | memoryview, type_: Any, content_type: str | None = None) -> Any: ...
def decode(data: bytes | bytearray | memoryview, type_: Any, content_type: str | None = None) -> Any:
    """Decode `data` as `type_`; raises `SchemaError` (with a field path) on any mismatch.

    Whatever the bytes are, the only exception is `SchemaError`: msgspec raises `UnicodeDecodeError`
    for invalid UTF-8 in a string and `RecursionError` for nesting deeper than the interpreter's
    recursion limit (~1,000 levels), and a callers' `except SchemaError` must cover those too."""
    msgpack = is_msgpack(content_type)
    try:
        decoder = _msgpack_decoder(type_) if msgpack else _json_decoder(type_)
        return decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise _schema_error(exc) from None
    except msgspec.DecodeError as exc:
        raise SchemaError(f"malformed {'msgpack' if msgpack else 'JSON'}: {exc}", None) from None
    except UnicodeDecodeError as exc:
        raise SchemaError(f"invalid UTF-8 at byte {exc.start}", None) from None
    except RecursionError:
        raise SchemaError("nesting too deep", None) from None
    except (ValueError, TypeError, OverflowError) as exc:  # anything else a value can make msgspec raise
        raise SchemaError(f"undecodable {'msgpack' if msgpack else 'JSON'}: {type(exc).__name__}: {exc}", None) from None


def encode(obj: Any, content_type: str | None = None) -> bytes:
    if is_msgpack(content_type):
        return _msgpack_encoder.encode(obj)
    return _json_encoder.encode(obj)


def encode_json(obj: Any) -> bytes:
    return _json_encoder.encode(obj)


def encode_msgpack(obj: Any) -> bytes:
    return _msgpack_encoder.encode(obj)


def to_builtins(obj: Any) -> Any:
    return msgspec.to_builtins(obj)


def convert(obj: Any, type_: type[T] | Any) -> T:
    """Validate already-decoded builtins (e.g. a dict from a JSON body) against `type_`."""
    try:
        return msgspec.convert(obj, type_)
    except msgspec.ValidationError as exc:
        raise _schema_error(exc) from None


def error_reply(code: ErrorCode, message: str, path: str | None = None, retry_after_s: float | None = None) -> ErrorReply:
    return ErrorReply(error=ErrorBody(code=code, message=message, path=path, retry_after_s=retry_after_s))


class _StatusProbe(msgspec.Struct):
    status: str = "ok"
    error: ErrorBody | None = None


class RemoteError(Exception):
    """An error envelope received from another service."""

    def __init__(self, code: ErrorCode, message: str, path: str | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.path = path
        self.retry_after_s = retry_after_s


def decode_reply(data: bytes, type_: type[T], content_type: str | None = None) -> T:
    """Decode a reply, raising `RemoteError` if it is an error envelope."""
    probe: _StatusProbe = decode(data, _StatusProbe, content_type)
    if probe.status == "error":
        err = probe.error or ErrorBody(code=ErrorCode.INTERNAL, message="error reply without body")
        raise RemoteError(err.code, err.message, err.path, err.retry_after_s)
    return decode(data, type_, content_type)
