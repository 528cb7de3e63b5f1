"""Push delivery of a stream for the lowest apply latency (the scheduler uses it for KVR_BOOKINGS).

`StreamFollower` (services.runtime) pulls in batches: every batch costs a pull-request round trip,
which under load adds several ms between a booking's publish and its apply — and a booking replica
answers `select` only after that apply. This feed uses an ordered push consumer instead (server
pushes each message as it is stored; flow control and idle heartbeats on; on a gap, a missed
heartbeat or a server restart nats-py recreates the consumer after the last stream sequence seen).
Same contract as `StreamFollower`: `apply(seq, subject, data, headers)` in stream order, nothing
twice, `applied_seq`, `caught_up` once the stream as of start has been applied.
"""

from __future__ import annotations

import asyncio

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy

from .follower import ApplyFn
from .logs import get_logger
from .tasks import cancel_and_wait

log = get_logger("kvr.push_follower")

class PushFollower:
    def __init__(self, nc: NATS, stream: str, filter_subject: str, apply: ApplyFn, *, idle_heartbeat_s: float = 1.0,
                 name: str = "bookings") -> None:  # fmt: skip
        self._nc = nc
        self._js = nc.jetstream()
        self.stream = stream
        self.filter_subject = filter_subject
        self._apply = apply
        self.idle_heartbeat_s = idle_heartbeat_s
        self.name = name
        self.next_seq = 1
        self.applied_seq = 0
        self.pending = 0
        self.caught_up = asyncio.Event()
        self._target_seq = 0
        self._sub = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"push-{self.stream}")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception:  # noqa: BLE001 - connection already closing
                pass

    async def _run(self) -> None:
        backoff = 0.1
        while self._sub is None:
            try:
                info = await self._js.stream_info(self.stream)
                self._target_seq = info.state.last_seq
                if info.state.messages == 0:
                    self.caught_up.set()
                cfg = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=self.next_seq)
                self._sub = await self._js.subscribe(
                    self.filter_subject, stream=self.stream, ordered_consumer=True, idle_heartbeat=self.idle_heartbeat_s,
                    config=cfg, cb=self._on_msg, pending_msgs_limit=-1, pending_bytes_limit=-1,
                )  # fmt: skip
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
                self.caught_up.set()

    async def _on_msg(self, msg: Msg) -> None:
        md = msg.metadata
        seq = md.sequence.stream
        if seq < self.next_seq:
            return  # redelivered after a consumer reset
        try:
            self._apply(seq, msg.subject, msg.data, msg.headers)
        except Exception:  # noqa: BLE001 - a poison message must never stall the stream
            log.exception("feed.apply_failed", stream=self.stream, seq=seq)
        self.applied_seq = seq
        self.next_seq = seq + 1
        self.pending = md.num_pending
        if md.num_pending == 0 or seq >= self._target_seq:
            self.caught_up.set()
