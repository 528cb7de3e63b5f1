"""structlog set-up: JSON lines in production, readable key=value on a terminal; secrets never printed."""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import MutableMapping
from typing import Any

import structlog

REDACTED = "***"
_MIN_SECRET_LEN = 3
_secrets: tuple[str, ...] = ()  # longest first, so a secret containing another is replaced whole
_secrets_lock = threading.Lock()


def register_secret(value: str | None) -> None:
    """Every later log line (structlog or stdlib) has `value` replaced by `***`. Services register
    what they read from password/token/seed files and any password in a NATS URL."""
    global _secrets
    if not value or len(value) < _MIN_SECRET_LEN or value in _secrets:
        return
    with _secrets_lock:
        _secrets = tuple(sorted({*_secrets, value}, key=len, reverse=True))


def redact(text: str) -> str:
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_redact_value(v) for v in value)
    if isinstance(value, dict):
        return {k: _redact_value(v) for k, v in value.items()}
    if isinstance(value, BaseException):
        return redact(f"{type(value).__name__}: {value}")
    return value


def redact_fields(body: dict[str, Any]) -> dict[str, Any]:
    """A status page or any other dict about to be shown: every registered secret replaced."""
    return _redact_value(body) if _secrets else body


def redact_secrets(_logger: Any, _name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: the last line of defence behind `natsauth.redact_url`."""
    if not _secrets:
        return event_dict
    for key, value in list(event_dict.items()):
        event_dict[key] = _redact_value(value)
    return event_dict


class _StdlibRedactor(logging.Filter):
    """Same for libraries that log through stdlib logging (nats-py, aiohttp, asyncio)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        # asyncio prints this for every TLS connection the server closes (e.g. a rejected client
        # certificate): one line per reconnect attempt that says nothing about the cause.
        if record.name == "asyncio" and "eof_received()" in msg:
            return False
        if _secrets:
            record.msg, record.args = redact(msg), None
            if record.exc_info:
                record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
                record.exc_info = None
        return True


def setup_logging(fmt: str = "auto", level: str = "info", service: str | None = None) -> structlog.stdlib.BoundLogger:
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    lvl = getattr(logging, level.upper(), logging.INFO)
    renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()) if fmt == "console" else structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            redact_secrets,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    # Libraries (nats, aiohttp) log through stdlib logging; keep them quiet unless asked.
    logging.basicConfig(level=max(lvl, logging.WARNING), stream=sys.stderr, format="%(levelname)s %(name)s %(message)s")
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _StdlibRedactor) for f in handler.filters):
            handler.addFilter(_StdlibRedactor())
    log = structlog.get_logger()
    if service:
        structlog.contextvars.bind_contextvars(service=service)
    return log


def get_logger(name: str | None = None) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name) if name else structlog.get_logger()
