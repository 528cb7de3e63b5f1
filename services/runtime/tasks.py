"""Background-task helpers shared by every adapter."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable


async def cancel_and_wait(*tasks: asyncio.Task | None | Iterable[asyncio.Task]) -> None:  # type: ignore[type-arg]
    """Cancel tasks and wait for them to finish; their cancellation or failure is not re-raised
    (a stopping service only needs them gone)."""
    flat: list[asyncio.Task] = []  # type: ignore[type-arg]
    for item in tasks:
        if item is None:
            continue
        if isinstance(item, asyncio.Task):
            flat.append(item)
        else:
            flat.extend(item)
    for task in flat:
        task.cancel()
    for task in flat:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
