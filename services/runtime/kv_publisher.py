"""The one publisher of KV-cache events to JetStream (docs/protocol.md §2), for every producer: the
relay beside vLLM, the mock fleet, and any Python engine integration.

`OutBuffer` is the pure part: a FIFO of items per (worker, dp rank), bounded by items and bytes.
An item is either a batch still encoded (the relay converts engine batches only when the publisher
takes them, so its converter's state describes exactly what is published), events already made
(the mock fleet), or a request to clear a rank. Full = drop the oldest items and mark their rank
for ONE `cleared`, taken before anything newer of that rank: the index then rebuilds from exactly
the items that were kept, and a long NATS stall costs one `cleared` per rank and *overflow
episode*, not one per drop.

`KvEventPublisher` drains it in order: consecutive items of one rank are coalesced into one message
(≤ `max_events` events, ≤ `max_blocks` blocks), published to `kvr.{pool}.kv.{worker}.{rank}` with
`Nats-Msg-Id: {pool}:{worker}:{rank}:{epoch}:{first_event_id}` (the epoch: when this publisher
started, docs/protocol.md §2). Up to `max_inflight` messages await their ack at once (a Python
client that awaits every ack is capped at 1/RTT messages per second); a message whose ack fails or
times out is re-published unchanged (same bytes, same id) until JetStream acknowledges it, so a NATS
outage loses nothing that fits in the buffer and JetStream stores each message once. With one
message in flight (the relay) the stream order is the publish order even across failures; with more
(the mock fleet), a message retried after a failure lands after the ones sent behind it, and the
indexer drops its event ids as going backwards (counted) — on a healthy connection acks do not fail.
Before a message whose last event id exceeds a persisted high-water mark, `reserve` may persist a
new one (the relay's `IdReservations`).

Producers either `push` (never waits: overflow drops, the relay's ZMQ intake must never block) or
`await publish(events)` (waits while the buffer is full: back-pressure, the mock fleet's engines).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from nats.js import JetStreamContext
from nats.js.api import PubAck

from schemas import codec
from schemas.events import MSG_ID, RouterEvent, kv_msg_id
from schemas.types import MAX_EVENTS_PER_MESSAGE

from .logs import get_logger
from .tasks import cancel_and_wait

log = get_logger("kvr.kv_publisher")

OVERFLOW = "buffer_overflow"
EVENT_BYTES = 64  # what one already-made event counts for in the byte budget


def blocks_of(ev: RouterEvent) -> int:
    data = ev.event.data
    if isinstance(data, str):
        return 0
    if data.stored is not None:
        return len(data.stored.blocks)
    return len(data.removed.block_hashes) if data.removed is not None else 0


@dataclass(slots=True)
class Pending:
    """One item of one rank: a batch still encoded (`payload`), events already made (`events`), or
    — neither — a request to clear the rank (`cause`: start, engine_restart, unrecoverable_gap,
    buffer_overflow, ...)."""

    dp_rank: int
    payload: bytes | None = None
    cause: str = ""
    events: list[RouterEvent] | None = None

    @property
    def size(self) -> int:
        if self.payload is not None:
            return len(self.payload)
        return EVENT_BYTES * len(self.events) if self.events is not None else 0


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


def made_events(item: Pending) -> list[RouterEvent]:
    """`Convert` of producers that push events already made (and never need a clear made)."""
    return item.events or []


class OutBuffer:
    """FIFO of items waiting for JetStream, bounded by items and bytes (pure).

    `convert` turns an encoded item or a clear into RouterEvents (decode + the relay's `Converter`);
    it is called only from `next_message`, in buffer order (items with `events` are taken as they
    are). Overflow drops the oldest items and records one pending clear per affected rank; the clear
    is taken before every remaining item (all newer than the dropped ones) and ends the rank's
    overflow episode: drops before it is taken add no second clear.
    """

    def __init__(self, convert: Convert, max_batches: int, max_bytes: int = 1 << 62) -> None:
        self.convert = convert
        self.max_batches = max(1, max_batches)
        self.max_bytes = max(1, max_bytes)
        self._q: deque[Pending] = deque()
        self._bytes = 0
        self._clears: dict[int, None] = {}  # ranks with a pending overflow clear, in order
        # Converted events not yet published (an item larger than one message's caps).
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

    def full(self) -> bool:
        return len(self._q) >= self.max_batches or self._bytes >= self.max_bytes

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
            out = item.events if item.events is not None else self.convert(item)
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


class PublishMetrics(Protocol):
    """What a producer counts (each has its own metric names: `kvr_relay_*`, `kvr_mock_worker_*`)."""

    def published(self, events: int, blocks: int, duplicate: bool, seconds: float) -> None: ...

    def failed(self) -> None: ...

    def buffer(self, items: int, size: int) -> None: ...

    def dropped(self, items: list[Pending]) -> None: ...


class _NoMetrics:
    def published(self, events: int, blocks: int, duplicate: bool, seconds: float) -> None:
        return None

    def failed(self) -> None:
        return None

    def buffer(self, items: int, size: int) -> None:
        return None

    def dropped(self, items: list[Pending]) -> None:
        return None


async def _no_reservation(dp_rank: int, last_id: int) -> None:
    return None


class KvEventPublisher:
    """One worker's KV events to JetStream, in order, through a bounded buffer (module doc)."""

    def __init__(
        self,
        js: JetStreamContext,
        *,
        pool: str,
        worker_id: int,
        subject_of: Callable[[int], str],
        buffer: OutBuffer | None = None,
        reserve: Callable[[int, int], Awaitable[None]] = _no_reservation,
        timeout_s: float = 2.0,
        msgpack: bool = True,
        max_events: int = 1024,
        max_blocks: int = 8192,
        max_inflight: int = 1,
        metrics: PublishMetrics | None = None,
        name: str = "kv-publisher",
        epoch: int | None = None,
    ) -> None:
        if max_events < 1 or max_inflight < 1:
            raise ValueError("max_events and max_inflight must be >= 1")
        self.js = js
        self.pool = pool
        self.worker_id = worker_id
        self.subject_of = subject_of
        self.buffer = buffer if buffer is not None else OutBuffer(made_events, 1024)
        self.reserve = reserve
        self.timeout_s = timeout_s
        self.msgpack = msgpack
        self.max_events = min(max_events, MAX_EVENTS_PER_MESSAGE)
        self.max_blocks = max(1, max_blocks)
        self.max_inflight = max_inflight
        self.metrics: PublishMetrics = metrics or _NoMetrics()
        self.name = name
        # This publisher's run (docs/protocol.md §2), in every Nats-Msg-Id: a restarted publisher
        # whose ids start over is then neither de-duplicated by JetStream nor dropped by the index.
        self.epoch = epoch if epoch is not None else time.time_ns() // 1_000_000
        self.published_messages = 0
        self.published_events = 0
        self.failures = 0
        self._window: deque[tuple[Outgoing, asyncio.Future[PubAck] | None, float]] = deque()
        self._last_ids: dict[int, int] = {}
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._room = asyncio.Event()
        self._room.set()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        for _, fut, _ in self._window:
            if fut is not None:
                fut.cancel()
        self._task = None

    # ---- producers ----------------------------------------------------------------------------

    def push(self, item: Pending) -> list[Pending]:
        """Queue an item (never waits); returns the items a full buffer dropped to make room."""
        dropped = self.buffer.push(item)
        if dropped:
            self.metrics.dropped(dropped)
        self._queued()
        return dropped

    async def publish(self, events: Iterable[RouterEvent]) -> None:
        """Queue events of this worker made in event-id order per rank, waiting while the buffer
        is full; returns once they are queued (`flushed` waits for their acks)."""
        runs: list[tuple[int, list[RouterEvent]]] = []  # consecutive events of one rank
        for ev in events:
            rank = ev.event.dp_rank
            if ev.worker_id != self.worker_id:
                raise ValueError(f"event for worker {ev.worker_id} on the publisher of worker {self.worker_id}")
            last = self._last_ids.get(rank, -1)
            if ev.event.event_id <= last:
                raise ValueError(f"event id {ev.event.event_id} not after {last} (dp rank {rank})")
            self._last_ids[rank] = ev.event.event_id
            if runs and runs[-1][0] == rank:
                runs[-1][1].append(ev)
            else:
                runs.append((rank, [ev]))
        for rank, run in runs:
            item = Pending(rank, events=run)
            while self.buffer.full():
                self._room.clear()
                await self._room.wait()
            self.buffer.push(item)
            self._queued()

    def _queued(self) -> None:
        self._idle.clear()
        self._wake.set()
        self.metrics.buffer(len(self.buffer), self.buffer.bytes)

    def pending(self) -> int:
        """Items and clears buffered plus messages awaiting their ack."""
        return len(self.buffer) + len(self._window)

    async def flushed(self, timeout: float | None) -> bool:
        """Wait until everything queued so far is acknowledged (or the timeout passes)."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False

    # ---- the drain ----------------------------------------------------------------------------

    def _encode(self, msg: OutMessage) -> Outgoing:
        headers = {MSG_ID: kv_msg_id(self.pool, self.worker_id, msg.dp_rank, msg.first_id, self.epoch)}
        if self.msgpack:
            headers[codec.CONTENT_TYPE_HEADER] = codec.MSGPACK
            payload = codec.encode_msgpack(msg.events)
        else:
            payload = codec.encode_json(msg.events)
        return Outgoing(self.subject_of(msg.dp_rank), msg.dp_rank, msg.last_id, headers, payload, len(msg.events), msg.n_blocks)

    async def _run(self) -> None:
        window = self._window
        while True:
            while len(window) < self.max_inflight:
                msg = self.buffer.next_message(self.max_events, self.max_blocks)
                if msg is None:
                    break
                self._room.set()
                out = self._encode(msg)
                window.append((out, await self._send(out), time.perf_counter()))
            self.metrics.buffer(len(self.buffer), self.buffer.bytes)
            if not window:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            out, fut, started = window[0]
            ack = await self._acknowledged(out, fut)
            window.popleft()
            self.published_messages += 1
            self.published_events += out.n_events
            self.metrics.published(out.n_events, out.n_blocks, ack.duplicate or False, time.perf_counter() - started)

    async def _send(self, out: Outgoing) -> asyncio.Future[PubAck] | None:
        """Send without waiting for the ack (more than one in flight), or None: publish it in
        `_acknowledged` (one in flight, or the send failed)."""
        if self.max_inflight == 1:
            return None
        try:
            await self.reserve(out.dp_rank, out.last_id)
            return await self.js.publish_async(out.subject, out.payload, headers=dict(out.headers))
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - not even sent: the retry path publishes it
            return None

    async def _acknowledged(self, out: Outgoing, fut: asyncio.Future[PubAck] | None) -> PubAck:
        """The ack of `out`: awaited, or the message is (re-)published until JetStream acknowledges it."""
        if fut is not None:
            try:
                return await asyncio.wait_for(fut, self.timeout_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - timeout or API error: publish it again, same id
                self._failed(exc)
        backoff = 0.05
        while True:
            try:
                await self.reserve(out.dp_rank, out.last_id)
                return await self.js.publish(out.subject, out.payload, timeout=self.timeout_s, headers=dict(out.headers))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - NATS down / slow: retry the same message
                self._failed(exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)

    def _failed(self, exc: BaseException) -> None:
        self.failures += 1
        self.metrics.failed()
        if self.failures <= 3 or self.failures % 100 == 0:
            log.warning("kv.publish_failed", publisher=self.name, error=str(exc) or type(exc).__name__, buffered=len(self.buffer))
