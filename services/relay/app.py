"""`kvr relay`: vLLM/SGLang ZMQ KV events → KVR_KV RouterEvents, plus the worker's discovery heartbeat.

Flow per dp rank: `RankIntake` (ZMQ SUB + replay) → the runtime's `KvEventPublisher` (its
`OutBuffer`, bounded, holds batches still encoded) → `decode_batch` → `Converter` (RouterEvents with
ids) → JetStream with Nats-Msg-Id, one message in flight (the stream order is the engine's).
Batches are converted when the publisher takes them, so the converter's state is exactly what was
published, even after the buffer dropped batches. Start-up order matters: the per-rank event-id
high-water marks are loaded *before* the sockets open, so ids never go back.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from typing import Any

import xxhash
import zmq
import zmq.asyncio

from schemas import codec
from schemas.discovery import WorkerRecord
from schemas.events import RouterEvent
from services.runtime.kv_publisher import KvEventPublisher, OutBuffer, Pending
from services.runtime.service import Runtime
from services.runtime.workers import delete_worker, heartbeat_loop, put_worker

from . import metrics
from .convert import Converter
from .decode import BadBatch, decode_batch
from .ids import IdReservations
from .ingest import RankIntake, rank_endpoints
from .plane import PlaneIntake
from .settings import RelayConfig

WORKER_ID_MASK = (1 << 53) - 1
_EVENTS = list[RouterEvent]


def worker_id_for(pod_name: str) -> int:
    """Deterministic worker id of a pod: xxh3_64(pod_name, seed 0) & (2**53 - 1) (JSON-safe)."""
    return xxhash.xxh3_64_intdigest(pod_name.encode()) & WORKER_ID_MASK


def resolve_identity(cfg: RelayConfig, env: dict[str, str] | None = None) -> tuple[str, int, str | None]:
    """(pod_name, worker_id, address) from flags, then the Downward API env (POD_NAME, POD_IP)."""
    env = dict(os.environ) if env is None else env
    pod_name = cfg.pod_name or env.get("POD_NAME") or socket.gethostname()
    worker_id = cfg.worker_id if cfg.worker_id >= 0 else worker_id_for(pod_name)
    address = cfg.address or env.get("POD_IP") or None
    return pod_name, worker_id, address


def worker_record(cfg: RelayConfig, pool: str, pod_name: str, worker_id: int, address: str | None) -> WorkerRecord:
    try:
        dp_ports = [int(p) for p in cfg.dp_ports]
    except ValueError:
        raise ValueError(f"dp_ports {cfg.dp_ports} are not integers") from None
    labels = {}
    for item in cfg.labels:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"label {item!r} is not key=value")
        labels[key] = value
    record = WorkerRecord(
        worker_id=worker_id,
        pool=pool,
        model=cfg.model,
        pod_name=pod_name,
        address=address,
        port=cfg.port,
        dp_start_rank=cfg.dp_start_rank,
        dp_size=cfg.dp_size,
        dp_ports=dp_ports or None,
        role=cfg.role,
        block_size=cfg.block_size,
        total_kv_blocks=cfg.total_kv_blocks or None,
        max_num_batched_tokens=cfg.max_num_batched_tokens or None,
        max_num_seqs=cfg.max_num_seqs or None,
        taints=list(cfg.taints),
        labels=labels,
        heartbeat_ms=0,
        ttl_s=cfg.heartbeat_ttl_s,
    )
    # Struct constructors do not check constraints; a round trip through the codec does.
    return codec.convert(codec.to_builtins(record), WorkerRecord)


class RelayApp:
    def __init__(self, cfg: RelayConfig) -> None:
        self.cfg = cfg
        if len(cfg.pool) != 1:
            raise ValueError(f"the relay serves exactly one pool, got {cfg.pool}")
        self.pool = cfg.pool[0]
        self.pod_name, self.worker_id, self.address = resolve_identity(cfg)
        self.record = worker_record(cfg, self.pool, self.pod_name, self.worker_id, self.address)  # validates flags
        self.dynamo = cfg.source == "dynamo"
        if not cfg.zmq:
            raise ValueError("no --zmq endpoint given")
        if self.dynamo:  # one socket for every endpoint: the events name their ranks
            if cfg.replay:
                raise ValueError("--replay is vLLM's replay socket; Dynamo's event plane has none (--source dynamo)")
            self.endpoints = dict.fromkeys(range(cfg.dp_start_rank, cfg.dp_start_rank + cfg.dp_size), ",".join(cfg.zmq))
            self.replay_endpoints: dict[int, str] = {}
        else:
            self.endpoints = rank_endpoints(list(cfg.zmq), cfg.dp_start_rank, cfg.dp_size)
            self.replay_endpoints = rank_endpoints(list(cfg.replay), cfg.dp_start_rank, cfg.dp_size)
        self.converter = Converter(
            self.worker_id,
            cfg.block_size,
            max_batch_blocks=cfg.max_batch_blocks,
            hash_map_capacity=cfg.hash_map_capacity,
            salt_from_extra_keys=cfg.salt_from_extra_keys,
        )
        self.rt: Runtime | None = None
        self.ctx: zmq.asyncio.Context | None = None
        self.intakes: list[RankIntake] = []
        self.plane: PlaneIntake | None = None
        self.publisher: KvEventPublisher | None = None
        self.ids: IdReservations | None = None
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._ready = False
        self._registered = False
        self.invalid_batches = 0

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self, rt: Runtime) -> None:
        self.rt = rt
        cfg = self.cfg
        self.ids = IdReservations(
            rt.nc, cfg.relay_bucket, self.pool, self.worker_id, cfg.id_reserve_step, replicas=cfg.stream_replicas
        )
        for rank in self.endpoints:
            self.converter.set_next_id(rank, await self.ids.load(rank))
        self.publisher = KvEventPublisher(
            rt.js,
            pool=self.pool,
            worker_id=self.worker_id,
            subject_of=lambda rank: rt.names.kv_subject(self.pool, self.worker_id, rank),
            buffer=OutBuffer(self._convert, cfg.buffer_messages, cfg.buffer_bytes),
            reserve=self.ids.ensure,
            timeout_s=cfg.publish_timeout_s,
            msgpack=cfg.publish_encoding == "msgpack",
            max_events=cfg.max_events_per_message,
            max_blocks=cfg.max_blocks_per_message,
            max_inflight=1,  # the stream order is the engine's, even across NATS failures
            metrics=metrics.PublishCounters(),
            name="relay-publisher",
        )
        self.publisher.start()
        if cfg.discovery:
            await self._heartbeat_once()
            self._heartbeat_task = asyncio.create_task(self._heartbeat_loop(), name="relay-heartbeat")
        self.ctx = zmq.asyncio.Context()
        try:
            self._open_intakes(self.ctx)
        except BaseException:
            # A bad endpoint of a later rank: the ranks already open are closed with the context.
            await self._close_zmq()
            raise
        rt.log.info(
            "relay.started",
            pool=self.pool,
            worker_id=self.worker_id,
            pod_name=self.pod_name,
            zmq=self.endpoints,
            replay=self.replay_endpoints,
            next_ids={r: self.converter.next_id(r) for r in self.endpoints},
        )
        self._ready = True

    def _open_intakes(self, ctx: zmq.asyncio.Context) -> None:
        cfg = self.cfg
        if self.dynamo:
            self.plane = PlaneIntake(
                ctx, list(cfg.zmq), set(self.endpoints), self.worker_id, topic=cfg.topic,
                events=self.apply_events, clear=self.clear_rank, clear_on_start=cfg.clear_on_start, hwm=cfg.zmq_hwm,
            )
            self.plane.start()
        for rank, endpoint in ({} if self.dynamo else self.endpoints).items():
            intake = RankIntake(
                ctx,
                rank,
                endpoint,
                self.replay_endpoints.get(rank),
                topic=cfg.topic,
                apply=self.apply_batch,
                clear=self.clear_rank,
                clear_on_start=cfg.clear_on_start,
                replay_timeout_s=cfg.replay_timeout_s,
                hwm=cfg.zmq_hwm,
            )
            self.intakes.append(intake)  # before it opens: whatever it opened is closed on failure
            intake.start()

    async def _close_zmq(self) -> None:
        """The intakes' tasks cancelled and sockets closed, then the context destroyed. `term()`
        blocks (the event loop with it) while any socket of the context is open, so `destroy`
        closes, with linger 0, whatever is left (a socket of a failed start or of a stop that was
        itself cancelled). Idempotent; the context stays, closed, in `self.ctx`."""
        try:
            for intake in self.intakes:
                await intake.stop()
            if self.plane is not None:
                await self.plane.stop()
        finally:
            if self.ctx is not None and not self.ctx.closed:
                self.ctx.destroy(linger=0)

    async def stop(self) -> None:
        self._ready = False
        await self._close_zmq()  # first: nothing new reaches the publisher, and a cancelled stop leaves no socket
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
        if self.publisher is not None:
            if not await self.publisher.flushed(5.0) and self.rt is not None:
                self.rt.log.warning("relay.unflushed_at_stop", pending=self.publisher.pending())
            await self.publisher.stop()
        if self._registered and self.rt is not None:
            try:
                await asyncio.wait_for(delete_worker(self.rt.nc, self.rt.names.workers_bucket, self.pool, self.worker_id), 3)
                self.rt.log.info("relay.deregistered", worker_id=self.worker_id)
            except Exception as exc:  # noqa: BLE001 - the record then expires by TTL
                self.rt.log.warning("relay.deregister_failed", error=str(exc))

    def ready(self) -> bool:
        return self._ready

    def status(self) -> dict[str, Any]:
        return {
            "pool": self.pool,
            "worker_id": self.worker_id,
            "pod_name": self.pod_name,
            "ranks": {
                str(i.dp_rank): {"last_seq": i.tracker.last, "batches": i.live_batches, "replays": i.replays}
                for i in self.intakes
            },
            "next_event_ids": {str(r): s.next_id for r, s in self.converter.ranks.items()},
            "source": self.cfg.source,
            "plane": (
                {"messages": self.plane.messages, "invalid": self.plane.invalid, "duplicates": self.plane.duplicates,
                 "publishers": len(self.plane.sequencer.publishers)}
                if self.plane is not None else None
            ),
            "buffered": self.publisher.pending() if self.publisher else 0,
            "published_events": self.publisher.published_events if self.publisher else 0,
            "invalid_batches": self.invalid_batches,
        }

    # -- events --------------------------------------------------------------------------------

    def apply_batch(self, dp_rank: int, seq: int, payload: bytes, source: str) -> None:
        # The socket a batch arrived on decides its rank (the envelope's rank is informational).
        self._push(Pending(dp_rank, payload))

    def apply_events(self, dp_rank: int, events: list[RouterEvent]) -> None:
        # Dynamo's events, already this worker's: kept encoded until the publisher takes them, when
        # they get their ids (so the relay's clears and a restarted publisher's ids stay in order).
        self._push(Pending(dp_rank, codec.encode_msgpack(events)))

    def clear_rank(self, dp_rank: int, cause: str) -> None:
        self._push(Pending(dp_rank, None, cause))

    def _push(self, item: Pending) -> None:
        if self.publisher is None:
            return
        episodes = self.publisher.buffer.overflows
        dropped = self.publisher.push(item)
        if dropped and self.publisher.buffer.overflows > episodes and self.rt is not None:
            # Logged once per overflow episode (per rank), not per dropped batch.
            self.rt.log.warning(
                "relay.buffer_overflow", dropped=len(dropped), clears_pending=self.publisher.buffer.pending_clears()
            )

    def _convert(self, item: Pending) -> list[RouterEvent]:
        """An item taken by the publisher → RouterEvents with ids (decode errors count and skip)."""
        if item.payload is None:  # a clear (the relay pushes no events already made)
            metrics.CLEARED_SENT.labels(item.cause).inc()
            out = self.converter.clear(item.dp_rank)
        elif self.dynamo:
            out = self.converter.restamp(item.dp_rank, codec.decode(item.payload, _EVENTS, codec.MSGPACK))
        else:
            try:
                batch = decode_batch(item.payload)
            except BadBatch as exc:
                self.invalid_batches += 1
                metrics.INVALID.labels(exc.reason).inc()
                if self.rt is not None:
                    self.rt.log.warning("relay.bad_batch", dp_rank=item.dp_rank, reason=exc.reason, detail=exc.detail[:200])
                return []
            try:
                out = self.converter.convert(item.dp_rank, batch.events)
            except Exception:  # one bad batch must never stop the publisher
                # The converter may have changed part of its state: start the rank over.
                self.invalid_batches += 1
                metrics.INVALID.labels("convert_failed").inc()
                metrics.CLEARED_SENT.labels("convert_failed").inc()
                if self.rt is not None:
                    self.rt.log.exception("relay.convert_failed", dp_rank=item.dp_rank)
                out = self.converter.clear(item.dp_rank)
        self._count()
        return out

    def _count(self) -> None:
        counts = self.converter.drain_counts()
        if not counts:
            return
        for name, n in counts.items():
            if name == "events_in":
                metrics.EVENTS_IN.inc(n)
            elif name == "blocks_out":
                metrics.BLOCKS_OUT.inc(n)
            elif name.startswith("out_"):
                metrics.EVENTS_OUT.labels(name[4:]).inc(n)
            elif name.startswith("invalid_"):
                metrics.INVALID.labels(name[8:]).inc(n)
            else:
                metrics.CONVERT.labels(name).inc(n)

    # -- discovery -----------------------------------------------------------------------------

    async def _heartbeat_once(self) -> bool:
        assert self.rt is not None
        self.record.heartbeat_ms = int(time.time() * 1000)
        try:
            await asyncio.wait_for(put_worker(self.rt.nc, self.rt.names.workers_bucket, self.record), 5)
            self._registered = True
            metrics.HEARTBEATS.inc()
            return True
        except Exception as exc:  # noqa: BLE001 - retried soon (heartbeat_loop)
            metrics.HEARTBEAT_FAILURES.inc()
            self.rt.log.warning("relay.heartbeat_failed", error=str(exc) or type(exc).__name__)
            return False

    async def _heartbeat_loop(self) -> None:
        await heartbeat_loop(self._heartbeat_once, max(0.05, self.cfg.heartbeat_ttl_s / 3))
