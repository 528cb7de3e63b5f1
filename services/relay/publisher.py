"""JetStream publishing with a bounded drop-oldest buffer, so the ZMQ intake never waits on NATS.

`OutBuffer` is the pure part (FIFO with a message bound). `Publisher` drains it in order: before a
message whose last event id exceeds the persisted high-water mark of its rank it persists a new mark
(`IdReservations`), then publishes with `Nats-Msg-Id` and retries the *same* message until JetStream
acknowledges it, so a NATS outage loses nothing that fits in the buffer and never duplicates.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from nats.aio.client import Client as NATS
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import BucketNotFoundError, KeyNotFoundError

from schemas import codec
from schemas.events import RouterEvent, kv_msg_id
from schemas.types import MAX_EVENTS_PER_MESSAGE
from services.runtime.logs import get_logger
from services.runtime.tasks import cancel_and_wait

from . import metrics

log = get_logger("kvr.relay.publisher")


@dataclass(slots=True)
class OutMessage:
    """RouterEvents of one rank, in id order, produced from one engine batch."""

    subject: str
    dp_rank: int
    events: list[RouterEvent]
    n_blocks: int

    @property
    def first_id(self) -> int:
        return self.events[0].event.event_id

    @property
    def last_id(self) -> int:
        return self.events[-1].event.event_id


@dataclass(slots=True)
class Outgoing:
    """One JetStream message being published; retried byte-for-byte until acknowledged."""

    subject: str
    dp_rank: int
    last_id: int
    headers: dict[str, str]
    payload: bytes
    n_events: int
    n_blocks: int


class OutBuffer:
    """FIFO of messages waiting for JetStream, bounded by evicting the oldest (`make_room`)."""

    def __init__(self, max_messages: int) -> None:
        self.max_messages = max(1, max_messages)
        self._q: deque[OutMessage] = deque()

    def __len__(self) -> int:
        return len(self._q)

    def make_room(self) -> list[OutMessage]:
        """Evict the oldest messages until one more fits; returns what was evicted."""
        dropped = []
        while len(self._q) >= self.max_messages:
            dropped.append(self._q.popleft())
        return dropped

    def push(self, msg: OutMessage) -> None:
        """Append; callers run `make_room` first (a repairing `cleared` may exceed the bound by one per rank)."""
        self._q.append(msg)

    def peek(self) -> OutMessage | None:
        return self._q[0] if self._q else None

    def pop(self) -> OutMessage:
        return self._q.popleft()

    def take(self, max_events: int, max_blocks: int = 1 << 62) -> list[OutMessage]:
        """Pop the head and the following messages of the same subject, up to `max_events` events
        and `max_blocks` blocks (the head is always taken whole)."""
        if not self._q:
            return []
        head = self._q.popleft()
        out, events, blocks = [head], len(head.events), head.n_blocks
        while self._q and self._q[0].subject == head.subject:
            nxt = self._q[0]
            if events + len(nxt.events) > max_events or blocks + nxt.n_blocks > max_blocks:
                break
            out.append(self._q.popleft())
            events += len(nxt.events)
            blocks += nxt.n_blocks
        return out


def id_key(pool: str, worker_id: int, dp_rank: int) -> str:
    return f"{pool}.{worker_id}.{dp_rank}"


class IdReservations:
    """Persisted event-id high-water marks, one key per (pool, worker, dp_rank) in a small KV bucket.

    The stored value R promises: no published event of that rank has an id > R. The publisher writes
    R' = last_id + step *before* publishing an id beyond R, so after a relay restart continuing from
    R + 1 can never reuse or go below a published id, even if the last writes before a crash were lost.
    """

    def __init__(self, nc: NATS, bucket: str, pool: str, worker_id: int, step: int, replicas: int = 1) -> None:
        self.nc = nc
        self.replicas = replicas
        self.bucket = bucket
        self.pool = pool
        self.worker_id = worker_id
        self.step = max(1, step)
        self.ceiling: dict[int, int] = {}
        self._kv = None

    async def _bucket(self):  # type: ignore[no-untyped-def]
        if self._kv is None:
            js = self.nc.jetstream()
            try:
                self._kv = await js.key_value(self.bucket)
            except BucketNotFoundError:
                self._kv = await js.create_key_value(
                    KeyValueConfig(bucket=self.bucket, history=1, storage=StorageType.FILE, replicas=self.replicas)
                )
        return self._kv

    async def load(self, dp_rank: int) -> int:
        """The first id this relay may use for a rank."""
        kv = await self._bucket()
        try:
            entry = await kv.get(id_key(self.pool, self.worker_id, dp_rank))
            ceiling = int((entry.value or b"0").decode())
        except KeyNotFoundError:
            ceiling = 0
        self.ceiling[dp_rank] = ceiling
        return ceiling + 1

    async def ensure(self, dp_rank: int, last_id: int) -> None:
        if last_id <= self.ceiling.get(dp_rank, 0):
            return
        kv = await self._bucket()
        ceiling = last_id + self.step
        await kv.put(id_key(self.pool, self.worker_id, dp_rank), str(ceiling).encode())
        self.ceiling[dp_rank] = ceiling
        metrics.ID_RESERVATIONS.inc()


class Publisher:
    """Drains the buffer in order. Consecutive messages of one rank are coalesced into one publish
    (up to `max_events` events); once attempted, a publish is retried unchanged, so a retry after a
    lost ack is de-duplicated by JetStream instead of publishing a different payload under its id."""

    def __init__(
        self,
        nc: NATS,
        buffer: OutBuffer,
        *,
        pool: str,
        worker_id: int,
        reserve: Callable[[int, int], Awaitable[None]],
        timeout_s: float = 2.0,
        msgpack: bool = True,
        max_events: int = 1024,
        max_blocks: int = 8192,
    ) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.buffer = buffer
        self.pool = pool
        self.worker_id = worker_id
        self.reserve = reserve
        self.timeout_s = timeout_s
        self.msgpack = msgpack
        self.max_events = max(1, min(max_events, MAX_EVENTS_PER_MESSAGE))
        self.max_blocks = max(1, max_blocks)
        self.published_messages = 0
        self.published_events = 0
        self.failures = 0
        self.inflight: Outgoing | None = None
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="relay-publisher")

    def make_room(self) -> list[OutMessage]:
        return self.buffer.make_room()

    def push(self, msg: OutMessage) -> None:
        self.buffer.push(msg)
        self._kick()

    def _kick(self) -> None:
        self._idle.clear()
        self._wake.set()
        metrics.BUFFERED.set(len(self.buffer))

    def pending(self) -> int:
        return len(self.buffer) + (1 if self.inflight is not None else 0)

    async def flushed(self, timeout: float) -> bool:
        """Wait until everything buffered has been acknowledged (or the timeout passes)."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    def _encode(self, msgs: list[OutMessage]) -> Outgoing:
        events = [ev for m in msgs for ev in m.events]
        head = msgs[0]
        headers = {"Nats-Msg-Id": kv_msg_id(self.pool, self.worker_id, head.dp_rank, head.first_id)}
        if self.msgpack:
            headers[codec.CONTENT_TYPE_HEADER] = codec.MSGPACK
            payload = codec.encode_msgpack(events)
        else:
            payload = codec.encode_json(events)
        return Outgoing(
            head.subject, head.dp_rank, msgs[-1].last_id, headers, payload, len(events), sum(m.n_blocks for m in msgs)
        )

    async def _run(self) -> None:
        backoff = 0.05
        while True:
            if self.inflight is None:
                msgs = self.buffer.take(self.max_events, self.max_blocks)
                if not msgs:
                    self._idle.set()
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                self.inflight = self._encode(msgs)
                metrics.BUFFERED.set(len(self.buffer))
            out = self.inflight
            try:
                await self.reserve(out.dp_rank, out.last_id)
                with metrics.PUBLISH_SECONDS.time():
                    ack = await self.js.publish(out.subject, out.payload, timeout=self.timeout_s, headers=out.headers)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - NATS down / slow: retry the same message
                self.failures += 1
                metrics.PUBLISH_FAILURES.inc()
                if self.failures <= 3 or self.failures % 100 == 0:
                    log.warning("relay.publish_failed", error=str(exc) or type(exc).__name__, buffered=len(self.buffer))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            backoff = 0.05
            self.inflight = None
            if ack.duplicate:
                metrics.PUBLISH_DUPLICATES.inc()
            self.published_messages += 1
            self.published_events += out.n_events
            metrics.PUBLISHED_MESSAGES.inc()
            metrics.PUBLISHED_EVENTS.inc(out.n_events)
            metrics.PUBLISHED_BLOCKS.inc(out.n_blocks)
