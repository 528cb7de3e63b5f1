"""Request/reply plumbing: decode → handler → encode, with every exception mapped to the envelope.

A `Responder` is one endpoint, typed by its request (`serve()` starts one); `request()` is the
client side. A bad request gets `invalid_request` with the field path; a handler's `ServiceError`
keeps its code; anything unexpected becomes `internal` and is logged. The subscription itself never
dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from schemas import codec
from schemas.api import ErrorCode
from schemas.codec import RemoteError, SchemaError

from .fastmetrics import Counter, Histogram
from .logs import get_logger
from .tracing import client_span, inject_headers, server_span

log = get_logger("kvr.responder")
T = TypeVar("T")
Req = TypeVar("Req")

REQUESTS = Counter("kvr_requests_total", "Requests answered, by subject and outcome", ["endpoint", "outcome"])
LATENCY = Histogram(
    "kvr_request_seconds",
    "Request handling time by endpoint",
    ["endpoint"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0),
)


class ServiceError(Exception):
    """A failure with a protocol error code (docs/protocol.md §5)."""

    def __init__(self, code: ErrorCode, message: str, path: str | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.path = path
        self.retry_after_s = retry_after_s  # a retry hint (`overloaded` from the admission queue)


Handler = Callable[[Any, Msg], Awaitable[Any]]


def retry_after_of(exc: BaseException) -> float | None:
    """The retry hint an error carries (ServiceError or a RemoteError passed on), if any."""
    hint = getattr(exc, "retry_after_s", None)
    return float(hint) if isinstance(hint, (int, float)) else None


def error_for(exc: BaseException) -> tuple[ErrorCode, str, str | None]:
    """(code, message, field path) of the envelope an exception becomes."""
    if isinstance(exc, SchemaError):
        return ErrorCode.INVALID_REQUEST, exc.message, exc.path
    if isinstance(exc, (ServiceError, RemoteError)):
        return exc.code, exc.message, exc.path
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return ErrorCode.TIMEOUT, "upstream did not answer in time", None
    return ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}", None


# Inline requests handled back to back before the subscription task yields to the event loop once,
# so a burst cannot starve the other tasks (stream followers, the NATS read loop).
INLINE_BURST = 64
# Requests larger than this are refused before decoding (NATS' max_payload, 1 MiB by default, is
# usually lower; this bounds the decode work when a server is configured with a larger one).
MAX_REQUEST_BYTES = 8 * 1024 * 1024


def decode_request(data: bytes, request_type: Any, content_type: str | None, max_bytes: int) -> Any:
    """The typed request, or `SchemaError` for anything that is not one (too large, undecodable,
    invalid UTF-8, nested too deep, wrong shape): every endpoint answers those `invalid_request`."""
    if len(data) > max_bytes:
        raise SchemaError(f"request is {len(data)} bytes, more than the limit of {max_bytes}", "$")
    return codec.decode(data, request_type, content_type)


class Responder(Generic[Req]):
    """One endpoint: requests on `subject` decoded as `request_type`, answered by `handler`.

    `max_inflight` > 1 runs handlers concurrently (for handlers that await other services); 1 keeps
    strict arrival order and the lowest overhead for CPU-only handlers. With concurrency,
    `inline(request)` → True says this request's handler will not suspend (e.g. a decision made in
    this process, without booking): it then runs in the subscription's own task instead of a new
    one, saving a task and a trip through the event loop per request."""

    def __init__(
        self,
        nc: NATS,
        subject: str,
        request_type: type[Req] | Any,
        handler: Callable[[Req, Msg], Awaitable[Any]],
        *,
        queue: str = "",
        endpoint: str | None = None,
        max_inflight: int = 1,
        inline: Callable[[Req], bool] | None = None,
        max_bytes: int = MAX_REQUEST_BYTES,
    ) -> None:
        self.nc = nc
        self.subject = subject
        self.request_type = request_type
        self.handler = handler
        self.queue = queue
        self.label = endpoint or subject
        self.inline = inline
        self.max_bytes = max_bytes
        self._sem = asyncio.Semaphore(max_inflight) if max_inflight > 1 else None
        self._tasks: set[asyncio.Task[None]] = set()
        self._latency = LATENCY.labels(self.label)  # children resolved once: labels() takes a lock and a lookup
        self._counters: dict[str, Any] = {}
        self._burst = 0

    async def start(self) -> Subscription:
        return await self.nc.subscribe(
            self.subject, queue=self.queue, cb=self._on_msg, pending_msgs_limit=1_000_000, pending_bytes_limit=1 << 30
        )

    def decode(self, msg: Msg) -> Req:
        decoded: Req = decode_request(msg.data, self.request_type, codec.content_type_of(msg.headers), self.max_bytes)
        return decoded

    async def answer(self, msg: Msg, req: Req | None = None) -> None:
        """Decode (unless `req` is given), handle, reply; every exception becomes the envelope."""
        started = time.perf_counter()
        ctype = codec.content_type_of(msg.headers)
        outcome: str = "ok"
        label = self.label
        attributes: dict[str, Any] = {"messaging.destination": msg.subject}
        with server_span(label, msg.headers, **attributes) as current:
            try:
                if req is None:
                    req = self.decode(msg)
                reply = await self.handler(req, msg)
                payload = codec.encode(reply, ctype)
            except BaseException as exc:  # map everything to the envelope
                if isinstance(exc, asyncio.CancelledError):
                    raise
                code, message, path = error_for(exc)
                outcome = code
                if code is ErrorCode.INTERNAL:
                    log.exception("request.failed", endpoint=label)
                else:
                    log.debug("request.rejected", endpoint=label, code=code, message=message, path=path)
                current.set_attribute("error.code", code)
                payload = codec.encode(codec.error_reply(code, message, path, retry_after_of(exc)), ctype)
        if msg.reply:
            headers = {codec.CONTENT_TYPE_HEADER: codec.MSGPACK} if codec.is_msgpack(ctype) else None
            try:
                await self.nc.publish(msg.reply, payload, headers=headers)
            except Exception as exc:  # noqa: BLE001 - connection trouble: the requester will time out
                log.warning("reply.failed", endpoint=label, error=str(exc))
        counter = self._counters.get(outcome)
        if counter is None:
            counter = self._counters[outcome] = REQUESTS.labels(label, outcome)
        counter.inc()
        self._latency.observe(time.perf_counter() - started)

    async def _on_msg(self, msg: Msg) -> None:
        sem = self._sem
        if sem is None:
            await self.answer(msg)
            return
        req = None
        if self.inline is not None:
            try:
                req = self.decode(msg)
                runs_inline = self.inline(req)
            except Exception:  # noqa: BLE001 - answer() decodes again and replies with the envelope
                await self.answer(msg)
                return
            if runs_inline:
                await self.answer(msg, req)
                self._burst += 1
                if self._burst >= INLINE_BURST:
                    self._burst = 0
                    await asyncio.sleep(0)
                return
        await sem.acquire()

        async def run() -> None:
            try:
                await self.answer(msg, req)
            finally:
                sem.release()

        task = asyncio.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


async def serve(
    nc: NATS,
    subject: str,
    request_type: type[Req] | Any,
    handler: Callable[[Req, Msg], Awaitable[Any]],
    *,
    queue: str = "",
    endpoint: str | None = None,
    max_inflight: int = 1,
    inline: Callable[[Req], bool] | None = None,
    max_bytes: int = MAX_REQUEST_BYTES,
) -> Subscription:
    """Answer requests on `subject` (a `Responder`); returns its subscription."""
    responder = Responder(
        nc, subject, request_type, handler, queue=queue, endpoint=endpoint, max_inflight=max_inflight, inline=inline,
        max_bytes=max_bytes,
    )
    return await responder.start()


async def request(
    nc: NATS,
    subject: str,
    payload: Any,
    reply_type: type[T],
    *,
    timeout: float = 2.0,
    msgpack: bool = False,
    span_name: str | None = None,
) -> T:
    """Send a typed request and decode the typed reply; error envelopes raise `RemoteError`."""
    ctype = codec.MSGPACK if msgpack else None
    attributes: dict[str, Any] = {"messaging.destination": subject}
    with client_span(span_name or subject, **attributes):
        headers = inject_headers({codec.CONTENT_TYPE_HEADER: codec.MSGPACK} if msgpack else None)
        data = bytes(payload) if isinstance(payload, (bytes, bytearray)) else codec.encode(payload, ctype)
        msg = await nc.request(subject, data, timeout=timeout, headers=headers or None)
    return codec.decode_reply(msg.data, reply_type, codec.content_type_of(msg.headers) or ctype)


async def unsubscribe_all(subs: list[Subscription]) -> None:
    """Stop answering: unsubscribe every endpoint (ignoring a connection that is already closing)."""
    for sub in subs:
        with contextlib.suppress(Exception):  # connection already closing
            await sub.unsubscribe()
    subs.clear()
