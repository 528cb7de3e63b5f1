"""structlog set-up: JSON lines in production, readable key=value on a terminal."""

from __future__ import annotations

import logging
import sys

import structlog


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
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    # Libraries (nats, aiohttp) log through stdlib logging; keep them quiet unless asked.
    logging.basicConfig(level=max(lvl, logging.WARNING), stream=sys.stderr, format="%(levelname)s %(name)s %(message)s")
    log = structlog.get_logger()
    if service:
        structlog.contextvars.bind_contextvars(service=service)
    return log


def get_logger(name: str | None = None) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name) if name else structlog.get_logger()
