"""Counting bad input without flooding the log: one counter per (source, reason), one log line per
key and interval with how many were suppressed, never a traceback (bad input is not a bug)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prometheus_client import Counter

from .logs import get_logger

log = get_logger("kvr.badinput")

MALFORMED = Counter(
    "kvr_malformed_messages_total",
    "Stream messages refused as malformed, by stream and reason (never applied)",
    ["stream", "reason"],
)


class RateLimitedLog:
    """At most one line per key every `interval_s`; the next line reports how many were dropped."""

    def __init__(self, interval_s: float = 10.0, clock: Callable[[], float] = time.monotonic, max_keys: int = 1024) -> None:
        self.interval_s = interval_s
        self._clock = clock
        self._last: dict[Any, float] = {}
        self._suppressed: dict[Any, int] = {}
        self._max_keys = max_keys

    def allow(self, key: Any) -> int | None:
        """None: stay quiet; otherwise log now, and the int is how many lines were suppressed."""
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return None
        if len(self._last) >= self._max_keys and key not in self._last:
            self._last.clear()  # bounded: a flood of distinct keys only costs a few extra lines
            self._suppressed.clear()
        self._last[key] = now
        return self._suppressed.pop(key, 0)

    def warning(self, event: str, key: Any = None, **fields: Any) -> None:
        suppressed = self.allow((event, key))
        if suppressed is not None:
            log.warning(event, suppressed=suppressed, **fields)


_RATE = RateLimitedLog()


def malformed(stream: str, reason: str, event: str, **fields: Any) -> None:
    """Count one malformed stream message and log it (rate-limited per stream, reason and event)."""
    MALFORMED.labels(stream, reason).inc()
    suppressed = _RATE.allow((stream, reason, event))
    if suppressed is not None:
        log.warning(event, stream=stream, reason=reason, suppressed=suppressed, **fields)
