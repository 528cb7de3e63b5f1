"""ZMQ intake of Dynamo's event plane (`kvr relay --source dynamo`): one SUB socket connected to
every `--zmq` endpoint (a Dynamo worker's publisher, or a broker's XPUB), frames decoded by
`schemas.dynamo`, sequences and publisher restarts judged by `PlaneSequencer` (pure), events handed
to the relay per dp rank. The relay serves one worker: Dynamo's instance id in the events is
replaced by the relay's worker id, and events of ranks the relay does not serve are skipped.

Bad input never stops it: a malformed message is counted (`kvr_relay_invalid_total{reason}`) and
skipped whole, before it touches any state (the next good one then shows the gap and clears);
messages are capped in size by the socket (`ZMQ_MAXMSGSIZE`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import zmq
import zmq.asyncio

from schemas.dynamo import BadFrame, decode_message
from schemas.events import RouterEvent, is_worker_domain
from services.runtime.logs import get_logger
from services.runtime.tasks import cancel_and_wait

from . import metrics
from .ingest import YIELD_EVERY, ClearFn, attach
from .seqtrack import PlaneSequencer

log = get_logger("kvr.relay.plane")

MAX_MESSAGE_BYTES = 64 << 20
EventsFn = Callable[[int, list[RouterEvent]], None]  # (dp_rank, events of the relay's worker)


def domain_label(domain: object) -> str:
    return domain if domain == "cache_owner" else ("null" if domain is None else "unknown")


class PlaneIntake:
    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        endpoints: list[str],
        ranks: set[int],
        worker_id: int,
        *,
        topic: str,
        events: EventsFn,
        clear: ClearFn,
        clear_on_start: bool = True,
        hwm: int = 100_000,
    ) -> None:
        self.ctx = ctx
        self.endpoints = endpoints
        self.ranks = ranks
        self.worker_id = worker_id
        self.topic = topic.encode()
        self._events = events
        self._clear = clear
        self.hwm = hwm
        self.sequencer = PlaneSequencer(clear_on_start)
        self.sub: zmq.asyncio.Socket | None = None
        self._task: asyncio.Task[None] | None = None
        self.messages = 0
        self.invalid = 0
        self.duplicates = 0

    def start(self) -> None:
        sub = self.ctx.socket(zmq.SUB)
        try:
            sub.setsockopt(zmq.LINGER, 0)
            sub.setsockopt(zmq.RCVHWM, self.hwm)
            sub.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
            sub.setsockopt(zmq.SUBSCRIBE, self.topic)
            for endpoint in self.endpoints:
                attach(sub, endpoint)  # a malformed endpoint raises ZMQError
        except BaseException:
            sub.close(linger=0)  # an open socket would block the context's term() forever
            raise
        self.sub = sub
        self._task = asyncio.create_task(self._run(), name="relay-dynamo-plane")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        if self.sub is not None:
            self.sub.close(linger=0)
        self.sub = None

    async def _run(self) -> None:
        assert self.sub is not None
        burst = 0
        while True:
            if burst >= YIELD_EVERY:  # let the publisher run while a backlog drains
                burst = 0
                await asyncio.sleep(0)
            frames = await self.sub.recv_multipart()
            burst += 1
            try:
                self.on_frames(frames)
            except Exception:
                self.invalid += 1
                metrics.INVALID.labels("plane_failed").inc()
                log.exception("relay.plane_failed")

    def on_frames(self, frames: list[bytes]) -> None:
        try:
            msg = decode_message(frames)
        except BadFrame as exc:
            self.invalid += 1
            metrics.INVALID.labels(exc.reason).inc()
            log.warning("relay.plane_bad_message", reason=exc.reason, detail=exc.detail[:200])
            return
        per_rank: dict[int, list[RouterEvent]] = {}
        for ev in msg.events:
            if not is_worker_domain(ev.residency_domain):
                metrics.OTHER_DOMAIN.labels(domain_label(ev.residency_domain)).inc()
                continue
            rank = ev.event.dp_rank
            if rank not in self.ranks:
                metrics.INVALID.labels("unknown_rank").inc()
                continue
            per_rank.setdefault(rank, []).append(ev.as_worker(self.worker_id))
        apply, clears = self.sequencer.on_message(msg.publisher_id, msg.sequence, set(per_rank))
        if not apply:
            self.duplicates += 1
            metrics.DUPLICATES.labels("all").inc()
            return
        self.messages += 1
        metrics.ZMQ_BATCHES.labels("all", "live").inc()
        for rank, cause in clears:
            label = str(rank)
            if cause == "unrecoverable_gap":
                metrics.SEQ_GAPS.labels(label).inc()
                metrics.UNRECOVERABLE_GAPS.labels(label).inc()
            elif cause == "engine_restart":
                metrics.ENGINE_RESTARTS.labels(label).inc()
            log.info("relay.plane_clear", dp_rank=rank, cause=cause, publisher_id=msg.publisher_id, sequence=msg.sequence)
            self._clear(rank, cause)
        for rank, events in per_rank.items():
            self._events(rank, events)
