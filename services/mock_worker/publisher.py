"""`KvEventPublisher`: what any Python engine integration needs to feed the router (docs/protocol.md §2).

Give it `RouterEvent`s in event-id order; it packs them into messages of at most `max_batch` events
(a JSON array per message, one worker and dp rank), publishes them to `kvr.{pool}.kv.{worker}.{rank}`
with `Nats-Msg-Id: {pool}:{worker}:{rank}:{first_event_id}`, and keeps up to `max_inflight`
JetStream acks outstanding instead of waiting for each one (a Python client that awaits every ack is
capped at 1/RTT messages per second).

A message whose ack fails or times out is re-published with the same Nats-Msg-Id, so JetStream
stores it at most once, with backoff (0.1 s doubling to 1 s) until `retry_deadline_s` after its
first attempt: a stream without a leader answers at once ("no responders") for the few seconds a
cluster takes to elect one, and a handful of quick retries would give up on every message of that
window (measured with tests/faults/: 125 events of 4 workers given up while the KV stream's leader
was killed). Later messages may already be stored by then; the router drops event ids that go
backwards, so a late retry is counted by the indexer and the worker's blocks in it stay unknown
until they are evicted or re-stored. On a healthy connection acks do not fail.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from nats.js import JetStreamContext

from schemas import codec
from schemas.events import RouterEvent, kv_msg_id
from schemas.subjects import Names

from .metrics import KV_EVENTS, KV_MESSAGES, KV_PUBLISH_FAILURES


class KvEventPublisher:
    def __init__(
        self,
        js: JetStreamContext,
        names: Names,
        pool: str,
        worker_id: int,
        dp_rank: int = 0,
        *,
        max_batch: int = 64,
        max_inflight: int = 256,
        ack_timeout_s: float = 5.0,
        retry_deadline_s: float = 30.0,
        msgpack: bool = False,
    ) -> None:
        if max_batch < 1 or max_inflight < 1:
            raise ValueError("max_batch and max_inflight must be >= 1")
        self._js = js
        self.pool = pool
        self.worker_id = worker_id
        self.dp_rank = dp_rank
        self.subject = names.kv_subject(pool, worker_id, dp_rank)
        self.max_batch = max_batch
        self.ack_timeout_s = ack_timeout_s
        self.retry_deadline_s = retry_deadline_s
        self.msgpack = msgpack
        self._slots = asyncio.Semaphore(max_inflight)
        self._tasks: set[asyncio.Task[None]] = set()
        self.messages = 0
        self.events = 0
        self.failures = 0
        self._last_event_id = -1

    async def publish(self, events: Iterable[RouterEvent]) -> None:
        """Queue events for publishing; returns once they are sent (acks arrive in the background)."""
        batch: list[RouterEvent] = []
        for ev in events:
            if ev.worker_id != self.worker_id or ev.event.dp_rank != self.dp_rank:
                raise ValueError(f"event for worker {ev.worker_id} rank {ev.event.dp_rank} on publisher {self.subject}")
            if ev.event.event_id <= self._last_event_id:
                raise ValueError(f"event id {ev.event.event_id} not after {self._last_event_id}")
            self._last_event_id = ev.event.event_id
            batch.append(ev)
            if len(batch) >= self.max_batch:
                await self._send(batch)
                batch = []
        if batch:
            await self._send(batch)

    async def _send(self, batch: list[RouterEvent]) -> None:
        ctype = codec.MSGPACK if self.msgpack else None
        payload = codec.encode(batch[0] if len(batch) == 1 else batch, ctype)
        headers = {"Nats-Msg-Id": kv_msg_id(self.pool, self.worker_id, self.dp_rank, batch[0].event.event_id)}
        if ctype:
            headers[codec.CONTENT_TYPE_HEADER] = ctype
        await self._slots.acquire()
        try:
            future = await self._js.publish_async(self.subject, payload, headers=dict(headers))
        except Exception:  # noqa: BLE001 - not even sent: fall back to the retry path
            future = None
        task = asyncio.create_task(self._await_ack(future, payload, headers, len(batch)))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _await_ack(self, future: asyncio.Future | None, payload: bytes, headers: dict, n_events: int) -> None:
        try:
            ok = False
            if future is not None:
                try:
                    await asyncio.wait_for(future, self.ack_timeout_s)
                    ok = True
                except Exception:  # noqa: BLE001 - timeout or API error: retry with the same msg id
                    ok = False
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.retry_deadline_s
            delay = 0.1
            while not ok and loop.time() < deadline:
                try:
                    await self._js.publish(self.subject, payload, timeout=self.ack_timeout_s, headers=dict(headers))
                    ok = True
                except Exception:  # noqa: BLE001 - no leader, no connection, no ack: the same message again
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 1.0)
            if ok:
                self.messages += 1
                self.events += n_events
                KV_MESSAGES.inc()
                KV_EVENTS.inc(n_events)
            else:
                self.failures += 1
                KV_PUBLISH_FAILURES.inc()
        finally:
            self._slots.release()

    @property
    def inflight(self) -> int:
        return len(self._tasks)

    async def flush(self, timeout: float | None = None) -> None:
        """Wait until every message sent so far is acknowledged (or given up on)."""
        if self._tasks:
            await asyncio.wait_for(asyncio.gather(*list(self._tasks), return_exceptions=True), timeout)
