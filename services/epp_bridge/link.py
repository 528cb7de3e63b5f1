"""How the bridge reaches the scheduler: NATS request/reply (default) or a scheduler in this process.

Both raise the same errors: `ServiceError(ErrorCode.TIMEOUT)` past the deadline or with no scheduler, the
scheduler's own error codes otherwise (`RemoteError` over NATS, `ServiceError` in process).
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from nats.errors import NoRespondersError

from schemas.api import CleanupReply, CleanupRequest, ErrorCode, SelectReply, SelectRequest
from services.runtime.responder import ServiceError, request
from services.runtime.service import Runtime
from services.scheduler.settings import SchedulerConfig


class SchedulerLink(Protocol):
    async def select(self, pool: str, req: SelectRequest, timeout: float) -> SelectReply: ...

    async def booking(self, pool: str, req: CleanupRequest, timeout: float) -> CleanupReply: ...


class DeadlinePassed(ServiceError):
    """The scheduler may still act on the request (and book it) after this error."""


class NoScheduler(ServiceError):
    """Nobody serves the pool: nothing can have been booked."""


def _timeout(pool: str, timeout: float) -> DeadlinePassed:
    return DeadlinePassed(ErrorCode.TIMEOUT, f"the scheduler of pool {pool!r} did not answer within {timeout}s")


class NatsSchedulerLink:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    async def _call(self, subject: str, pool: str, req: Any, reply_type: Any, timeout: float) -> Any:
        try:
            return await request(self.rt.nc, subject, req, reply_type, timeout=timeout)
        except NoRespondersError:
            raise NoScheduler(ErrorCode.TIMEOUT, f"no scheduler is serving pool {pool!r}") from None
        except TimeoutError:
            raise _timeout(pool, timeout) from None

    async def select(self, pool: str, req: SelectRequest, timeout: float) -> SelectReply:
        return await self._call(self.rt.names.select(pool), pool, req, SelectReply, timeout)

    async def booking(self, pool: str, req: CleanupRequest, timeout: float) -> CleanupReply:
        return await self._call(self.rt.names.booking(pool), pool, req, CleanupReply, timeout)


class EmbeddedSchedulerLink:
    """One-process mode: a `SchedulerApp` started on the bridge's connection, called directly.

    The scheduler still serves its NATS subjects (other bridges and tools can use it); this process
    skips the two NATS hops per query.
    """

    def __init__(self, cfg: SchedulerConfig) -> None:
        from services.scheduler.app import SchedulerApp

        self.app = SchedulerApp(cfg)
        # The scheduler's request handlers (coroutines taking pool and request).
        self._select = self.app.select
        self._booking = self.app.booking

    async def start(self, rt: Runtime) -> None:
        await self.app.start(rt)

    async def stop(self) -> None:
        await self.app.stop()

    def ready(self) -> bool:
        return self.app.ready()

    def decides_inline(self, book: bool) -> bool:
        return bool(self.app.decides_inline(book))

    # asyncio.timeout, not wait_for: wait_for (3.11) wraps the call in a new task, one more trip
    # through the event loop per query.
    async def select(self, pool: str, req: SelectRequest, timeout: float) -> SelectReply:
        if self.decides_inline(req.book):
            # Runs to the end without suspending, so no deadline could interrupt it: skip the timer.
            return await self._select(pool, req)
        try:
            async with asyncio.timeout(timeout):
                return await self._select(pool, req)
        except TimeoutError:
            raise _timeout(pool, timeout) from None

    async def booking(self, pool: str, req: CleanupRequest, timeout: float) -> CleanupReply:
        try:
            async with asyncio.timeout(timeout):
                return await self._booking(pool, req)
        except TimeoutError:
            raise _timeout(pool, timeout) from None
