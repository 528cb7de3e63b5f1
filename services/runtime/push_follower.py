"""Push delivery of a stream for the lowest apply latency (the scheduler uses it for KVR_BOOKINGS).

`StreamFollower` (services.runtime) pulls in batches: every batch costs a pull-request round trip,
which under load adds several ms between a booking's publish and its apply — and a booking replica
answers `select` only after that apply. This feed uses an ordered push consumer instead (server
pushes each message as it is stored; flow control and idle heartbeats on; on a gap, a missed
heartbeat or a server restart nats-py recreates the consumer after the last stream sequence seen).
Same contract as `StreamFollower`: `apply(seq, subject, data, headers)` in stream order, nothing
twice, `applied_seq`, `caught_up` once the stream as of start has been applied (from the server's
account: a message with nothing pending after it, or the stream's last sequence at start applied),
`ready()` (caught up, connected, within `max_lag_s`). Memory stays bounded whatever the backlog:
flow control is on and nats-py answers the server's flow-control requests only once the messages
before them were handed to `apply`, so the server never has more than a window in flight to us.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy

from .badinput import RateLimitedLog
from .follower import APPLY_FAILURES, FOLLOWERS, ApplyFn, parse_ack_reply
from .logs import get_logger
from .progress import FollowerProgress
from .tasks import cancel_and_wait

log = get_logger("kvr.push_follower")

class PushFollower:
    def __init__(self, nc: NATS, stream: str, filter_subject: str, apply: ApplyFn, *, idle_heartbeat_s: float = 1.0,
                 name: str = "bookings", max_lag_s: float = 0.0, poll_interval_s: float = 1.0,
                 clock: Callable[[], float] = time.time) -> None:
        self._nc = nc
        self._js = nc.jetstream()
        self.stream = stream
        self.filter_subject = filter_subject
        self._apply = apply
        self.idle_heartbeat_s = idle_heartbeat_s
        self.name = name
        self.next_seq = 1
        self.applied_seq = 0
        self.max_lag_s = max_lag_s
        self.poll_interval_s = poll_interval_s
        self._clock = clock
        self.progress = FollowerProgress(clock())
        self.caught_up = asyncio.Event()
        self.apply_failures = 0
        self._target_seq = 0
        self._sub: Any = None
        self._task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._errors = RateLimitedLog(30.0)
        self._failures_metric = APPLY_FAILURES.labels(name)
        FOLLOWERS.add(self)

    @property
    def pending(self) -> int:
        return self.progress.pending or 0

    def lag_s(self) -> float:
        return self.progress.lag_s(self._clock())

    def ready(self) -> bool:
        return self.caught_up.is_set() and self._nc.is_connected and self.progress.ready(self._clock(), self.max_lag_s)

    def state(self) -> dict[str, Any]:
        return {
            "applied_seq": self.applied_seq,
            "pending": self.progress.pending,
            "lag_s": round(self.lag_s(), 3),
            "caught_up": self.caught_up.is_set(),
            "connected": self._nc.is_connected,
            "apply_failures": self.apply_failures,
        }

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"push-{self.stream}")
        self._watch_task = asyncio.create_task(self._watch(), name=f"push-watch-{self.stream}")

    async def stop(self) -> None:
        await cancel_and_wait(self._watch_task)
        await cancel_and_wait(self._task)
        if self._sub is not None:
            with contextlib.suppress(Exception):  # the connection may already be closing
                await self._sub.unsubscribe()

    async def _run(self) -> None:
        backoff = 0.1
        while self._sub is None:
            try:
                info = await self._js.stream_info(self.stream)
                self._target_seq = info.state.last_seq
                if info.state.messages == 0:
                    self._nothing_pending()
                cfg = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=self.next_seq)
                self._sub = await self._js.subscribe(
                    self.filter_subject, stream=self.stream, ordered_consumer=True, idle_heartbeat=self.idle_heartbeat_s,
                    config=cfg, cb=self._on_msg, pending_msgs_limit=-1, pending_bytes_limit=-1,
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - server not there yet: retry
                log.warning("feed.subscribe_failed", stream=self.stream, error=str(exc))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
        # Messages that aged out between stream_info and the subscription would leave `caught_up`
        # unset forever: re-check the stream position until caught up.
        while not self.caught_up.is_set():
            await asyncio.sleep(0.5)
            try:
                info = await self._js.stream_info(self.stream)
            except Exception:  # noqa: BLE001
                continue
            if info.state.messages == 0 or self.applied_seq >= min(self._target_seq, info.state.last_seq):
                self._nothing_pending()

    def _nothing_pending(self) -> None:
        self.progress.server_account(0, self.applied_seq, self.applied_seq, self._clock())
        self.caught_up.set()

    async def _on_msg(self, msg: Msg) -> None:
        meta = parse_ack_reply(msg.reply)
        if meta is None:
            return
        seq, num_pending, stored_ns = meta
        if seq < self.next_seq:
            return  # redelivered after a consumer reset
        try:
            self._apply(seq, msg.subject, msg.data, msg.headers)
        except Exception:  # a poison message must never stall the stream
            self.apply_failures += 1
            self._failures_metric.inc()
            if self._errors.allow("apply") is not None:
                log.exception("feed.apply_failed", stream=self.stream, seq=seq)
        self.applied_seq = seq
        self.next_seq = seq + 1
        self.progress.applied(num_pending, stored_ns / 1e9, self._clock())
        if num_pending == 0 or seq >= self._target_seq:
            self.caught_up.set()

    async def _watch(self) -> None:
        """The server's pending count now and then, so lag is known while no message arrives."""
        while True:
            await asyncio.sleep(self.poll_interval_s)
            sub = self._sub
            if sub is None or not self._nc.is_connected:
                continue
            with contextlib.suppress(Exception):
                info = await sub.consumer_info()
                delivered = info.delivered.stream_seq if info.delivered else 0
                self.progress.server_account(info.num_pending or 0, delivered, self.applied_seq, self._clock())
