"""JetStream publishing through a bounded buffer, so the ZMQ intake never waits on NATS.

`OutBuffer` is the pure part. It holds engine batches *still encoded* (and requests to clear a rank)
and converts them only when the publisher takes them, so the converter's state (refcounts, event
ids) always describes exactly what is published. Full (by batches or bytes) = drop the oldest
batches and mark their rank for ONE `cleared`, taken before anything newer of that rank: the index
then rebuilds from exactly the batches that were kept, and a long NATS stall costs one `cleared` per
rank, not one per drop. `Publisher` drains it in order: before a message whose last event id exceeds
the persisted high-water mark of its rank it persists a new mark (`IdReservations`), then publishes
with `Nats-Msg-Id` and retries the *same* message until JetStream acknowledges it, so a NATS outage
loses nothing that fits in the buffer and never duplicates.
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

OVERFLOW = "buffer_overflow"


def blocks_of(ev: RouterEvent) -> int:
    data = ev.event.data
    if isinstance(data, str):
        return 0
    return len(data.stored.blocks) if data.stored is not None else len(data.removed.block_hashes)  # type: ignore[union-attr]


@dataclass(slots=True)
class Pending:
    """One engine batch of one rank, still encoded, or (payload None) a request to clear the rank."""

    dp_rank: int
    payload: bytes | None = None
    cause: str = ""  # of a clear: start, engine_restart, unrecoverable_gap, buffer_overflow

    @property
    def size(self) -> int:
        return len(self.payload) if self.payload is not None else 0


@dataclass(slots=True)
class OutMessage:
    """RouterEvents of one rank, in id order: one JetStream message."""

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


Convert = Callable[[Pending], list[RouterEvent]]


class OutBuffer:
    """FIFO of engine batches waiting for JetStream, bounded by batches and bytes (pure).

    `convert` turns an item into RouterEvents (decode + `Converter`); it is called only from
    `next_message`, in buffer order. Overflow drops the oldest items and records one pending clear
    per affected rank; the clear is taken before every remaining item (all newer than the dropped
    ones) and ends the rank's overflow episode: drops before it is taken add no second clear.
    """

    def __init__(self, convert: Convert, max_batches: int, max_bytes: int = 1 << 62) -> None:
        self.convert = convert
        self.max_batches = max(1, max_batches)
        self.max_bytes = max(1, max_bytes)
        self._q: deque[Pending] = deque()
        self._bytes = 0
        self._clears: dict[int, None] = {}  # ranks with a pending overflow clear, in order
        # Converted events not yet published (an engine batch larger than one message's caps).
        self._carry: list[RouterEvent] = []
        self._carry_rank = 0
        self.dropped_batches = 0
        self.dropped_bytes = 0
        self.overflows = 0  # overflow episodes (= clears they cost)

    def __len__(self) -> int:
        return len(self._q) + len(self._clears) + (1 if self._carry else 0)

    @property
    def bytes(self) -> int:
        return self._bytes

    def pending_clears(self) -> list[int]:
        return list(self._clears)

    def push(self, item: Pending) -> list[Pending]:
        """Append; when full, drop the oldest items first. Returns what was dropped."""
        dropped: list[Pending] = []
        while self._q and (len(self._q) >= self.max_batches or self._bytes + item.size > self.max_bytes):
            old = self._q.popleft()
            self._bytes -= old.size
            dropped.append(old)
            self.dropped_batches += 1
            self.dropped_bytes += old.size
            if old.dp_rank not in self._clears:
                self._clears[old.dp_rank] = None
                self.overflows += 1
        self._q.append(item)
        self._bytes += item.size
        return dropped

    def _next_rank(self) -> int | None:
        if self._clears:
            return next(iter(self._clears))
        return self._q[0].dp_rank if self._q else None

    def _pop(self) -> Pending:
        if self._clears:
            rank = next(iter(self._clears))
            del self._clears[rank]
            return Pending(rank, None, OVERFLOW)
        item = self._q.popleft()
        self._bytes -= item.size
        return item

    def next_message(self, max_events: int, max_blocks: int = 1 << 62) -> OutMessage | None:
        """Convert and take the next message: the carry, then pending clears, then queued items,
        coalescing consecutive items of one rank up to `max_events` events and `max_blocks` blocks
        (one event is always taken). None when nothing is left."""
        max_events, max_blocks = max(1, max_events), max(1, max_blocks)
        events, rank = self._carry, self._carry_rank
        self._carry = []
        blocks = sum(blocks_of(ev) for ev in events)
        while len(events) < max_events and blocks < max_blocks:
            nxt = self._next_rank()
            if nxt is None or (events and nxt != rank):
                break
            item = self._pop()
            rank = item.dp_rank
            out = self.convert(item)
            events.extend(out)
            blocks += sum(blocks_of(ev) for ev in out)
        if not events:
            return None
        n, n_blocks = 0, 0
        for ev in events:
            size = blocks_of(ev)
            if n and (n >= max_events or n_blocks + size > max_blocks):
                break
            n += 1
            n_blocks += size
        if n < len(events):
            self._carry, self._carry_rank = events[n:], rank
        return OutMessage(rank, events[:n], n_blocks)


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
    """Drains the buffer in order. Consecutive items of one rank are coalesced into one publish (up to
    `max_events` events and `max_blocks` blocks); once attempted, a publish is retried unchanged, so a
    retry after a lost ack is de-duplicated by JetStream instead of publishing a different payload
    under its id."""

    def __init__(
        self,
        nc: NATS,
        buffer: OutBuffer,
        *,
        pool: str,
        worker_id: int,
        subject_of: Callable[[int], str],
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
        self.subject_of = subject_of
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

    def push(self, item: Pending) -> list[Pending]:
        """Queue an item (never waits); returns the items a full buffer dropped to make room."""
        dropped = self.buffer.push(item)
        if dropped:
            metrics.DROPPED_MESSAGES.inc(len(dropped))
            metrics.DROPPED_BYTES.inc(sum(d.size for d in dropped))
        self._idle.clear()
        self._wake.set()
        self._gauges()
        return dropped

    def _gauges(self) -> None:
        metrics.BUFFERED.set(len(self.buffer))
        metrics.BUFFERED_BYTES.set(self.buffer.bytes)

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

    def _encode(self, msg: OutMessage) -> Outgoing:
        headers = {"Nats-Msg-Id": kv_msg_id(self.pool, self.worker_id, msg.dp_rank, msg.first_id)}
        if self.msgpack:
            headers[codec.CONTENT_TYPE_HEADER] = codec.MSGPACK
            payload = codec.encode_msgpack(msg.events)
        else:
            payload = codec.encode_json(msg.events)
        return Outgoing(
            self.subject_of(msg.dp_rank), msg.dp_rank, msg.last_id, headers, payload, len(msg.events), msg.n_blocks
        )

    async def _run(self) -> None:
        backoff = 0.05
        while True:
            if self.inflight is None:
                msg = self.buffer.next_message(self.max_events, self.max_blocks)
                self._gauges()
                if msg is None:
                    self._idle.set()
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                self.inflight = self._encode(msg)
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
