"""Background-task helpers shared by every adapter."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from .logs import get_logger

log = get_logger("kvr.tasks")


async def cancel_and_wait(*tasks: asyncio.Task | None | Iterable[asyncio.Task], timeout: float = 10.0) -> None:
    """Cancel tasks and wait until they are gone; their cancellation or failure is not re-raised
    (a stopping service only needs them gone).

    Cancellation is repeated: a library call that swallows one `CancelledError` (seen with nats-py
    object-store writes) would otherwise leave a `while True` loop running and the stop waiting
    forever. After `timeout` seconds the remaining tasks are logged and abandoned.
    """
    pending: set[asyncio.Task] = set()
    for item in tasks:
        if item is None:
            continue
        if isinstance(item, asyncio.Task):
            pending.add(item)
        else:
            pending.update(item)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=min(0.5, max(deadline - loop.time(), 0.01)))
        if pending and loop.time() >= deadline:
            log.warning("tasks.not_stopped", tasks=sorted(t.get_name() for t in pending))
            return
