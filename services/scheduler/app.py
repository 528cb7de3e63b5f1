"""The scheduler's imperative shell: discovery + bookings stream in, select/booking/state out.

The decision itself is `decide.Decider` (pure, shared with the offline simulator); this adapter
feeds it (live candidates from the process's discovery watcher, the load of `state.BookingState`,
the overlaps of its index replica or of the indexer service) and does its I/O: publishing the
booking events it returns and waiting until they are applied. Every replica applies every booking
from KVR_BOOKINGS (its own too) in stream order, so all replicas converge on one load view. A
replica that books a request replies only after it has applied its own booking from the stream, so
its next decision already sees that load.
"""

from __future__ import annotations

import asyncio
import heapq
import random
import time
import uuid
from collections import deque
from collections.abc import Sequence
from typing import Any

from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import APIError, NoStreamResponseError

from schemas import codec
from schemas.api import (
    POLICY_NAMES,
    CleanupReply,
    CleanupRequest,
    ErrorCode,
    Policy,
    SelectReply,
    SelectRequest,
    StateReply,
    StateRequest,
    WorkerLoad,
)
from schemas.bookings import (
    BookingAdd,
    BookingEvent,
    BookingFree,
    BookingMove,
    BookingPrefillComplete,
    booking_msg_id,
    new_booking_id,
)
from schemas.codec import SchemaError
from schemas.discovery import LoadReport, WorkerRecord
from services.runtime.badinput import malformed
from services.runtime.follower import StreamFollower
from services.runtime.logs import get_logger
from services.runtime.push_follower import PushFollower
from services.runtime.responder import ServiceError, serve, unsubscribe_all
from services.runtime.service import Runtime
from services.runtime.tasks import cancel_and_wait
from services.runtime.tracing import consumer_span, inject_headers, producer_span
from services.runtime.workers import WorkerEntry, WorkerWatcher, now_ms

from . import metrics as m
from .admission import AdmissionQueue, Waiting
from .candidates import Candidate, candidates_of
from .decide import Decider, PoolView, Prepared
from .load import LoadTracker
from .overlap import EmbeddedOverlap, LocalOverlaps, NatsOverlap, PredictedOverlap
from .predicted import PredictedCache
from .selector import Overlaps, ReportedLoad, SelectionError, Selector
from .settings import SchedulerConfig
from .state import BookingState

log = get_logger("kvr.scheduler")
QUEUE = "scheduler"
STREAM_FULL = 10077  # JetStream error code of a publish refused by a full discard-new stream
LAG_WINDOW = 20_000
_KIND: dict[type, str] = {
    BookingAdd: "add", BookingPrefillComplete: "prefill_complete", BookingMove: "move", BookingFree: "free",
}
_PHASE = {
    phase: m.PHASE_SECONDS.labels(phase)
    for phase in ("hashing", "match", "scoring", "booking", "booking_publish", "booking_apply")
}


def _policy_table(entries: Sequence[str]) -> dict[str, Policy]:
    out: dict[str, Policy] = {}
    for item in entries:
        pool, sep, policy = item.partition("=")
        if not sep or policy not in POLICY_NAMES:
            raise ValueError(f"bad --pool-policy entry {item!r} (want pool={'|'.join(POLICY_NAMES)})")
        out[pool] = Policy(policy)
    return out


class SchedulerApp:
    """Usable standalone (`kvr scheduler`) or embedded (the EPP bridge's one-process mode): construct
    with a resolved config, `await start(rt)`, then call `select()` / `booking()` directly."""

    def __init__(self, cfg: SchedulerConfig) -> None:
        self.cfg = cfg
        self.router_id: str = cfg.router_id or f"sched-{uuid.uuid4().hex[:10]}"
        # The rule and the busy thresholds from the routing settings, as the offline simulator builds them.
        self.cost = cfg.routing.cost()
        rng = random.Random(cfg.seed) if cfg.seed >= 0 else random.Random()
        self.selector = Selector(cfg.routing.busy(), rng)
        self.decider = Decider(
            self.selector, self.cost, router_id=self.router_id, default_block_size=cfg.block_size,
            max_request_tokens=cfg.max_request_tokens,
        )
        self.pool_policy = _policy_table(cfg.pool_policy)
        self.default_policy = Policy(cfg.selection_policy)
        self.ttl_ms = int(cfg.booking_ttl_s * 1000)
        self.unconfirmed_ttl_ms = int(cfg.booking_unconfirmed_ttl_s * 1000)
        self.states: dict[str, BookingState] = {}  # per pool: the bookings fold (load, removals, own adds)
        self.predicted: PredictedCache | None = None
        self.overlap: LocalOverlaps | NatsOverlap | None = None
        self.watcher: WorkerWatcher | None = None
        self.follower: StreamFollower | PushFollower | None = None
        self.rt: Runtime | None = None
        self._cand_cache: dict[str, list[tuple[WorkerEntry, list[Candidate]]]] = {}
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._waiter_n = 0
        self._applied_seq = 0
        self._tail_floor = 0
        self._ready = False
        self._subs: list[Any] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._gauge_labels: set[tuple[str, str, str]] = set()
        # Event ts → applied here; "remote" = bookings made by other replicas (convergence lag).
        self.lags_ms: deque[float] = deque(maxlen=LAG_WINDOW)
        self.remote_lags_ms: deque[float] = deque(maxlen=LAG_WINDOW)
        self.sync_timeouts = 0
        self._counters: dict[tuple[str, str, str], Any] = {}
        self._hit_ratio: dict[str, Any] = {}
        self._reports: dict[str, dict[tuple[int, int], tuple[ReportedLoad, int]]] = {}
        self.match_failures = 0
        # Admission queue, per pool (this replica's waiting booking selects): the pure rule, each
        # ticket's decision inputs and wake-up future, the ticket admitted and not yet decided.
        self.queues: dict[str, AdmissionQueue] = {}
        self._queued: dict[str, dict[int, tuple[Prepared, Policy, asyncio.Future[bool]]]] = {}
        self._admitting: dict[str, int | None] = {}
        self._kicked: set[str] = set()
        self._tickets = 0

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self, rt: Runtime) -> None:
        """Listen to the process's discovery watcher (shared with an embedded index replica and, in
        the one-process mode, the bridge), start the overlap source, then catch up in the background:
        discovery first, then the bookings stream, then serve."""
        self.rt = rt
        self.states = {pool: BookingState(self.ttl_ms, self.unconfirmed_ttl_ms) for pool in rt.pools}
        self.queues = {pool: AdmissionQueue(self.cfg.routing.queue_max_size) for pool in rt.pools}
        self._queued = {pool: {} for pool in rt.pools}
        self.watcher = rt.discovery()
        self.watcher.listen(self._on_worker_put, self._on_worker_remove, expire=True)
        if self.cfg.no_kv_events:
            self.predicted = PredictedCache(int(self.cfg.approx_ttl_s * 1000), self.cfg.approx_max_blocks, self.cfg.block_size)
            self.overlap = PredictedOverlap(self.predicted, now_ms)
        elif self.cfg.embedded_indexer:
            embedded = EmbeddedOverlap(self.cfg.index)
            await embedded.start(rt)
            self.overlap = embedded
        else:
            self.overlap = NatsOverlap(rt.nc, rt.names, self.cfg.match_timeout_s)
        max_lag = self.cfg.max_ready_lag_s
        if self.cfg.bookings_feed == "push":
            self.follower = PushFollower(
                rt.nc, rt.names.bookings_stream, rt.names.bookings_filter("*"), self._apply_booking, max_lag_s=max_lag
            )
        else:
            self.follower = StreamFollower(
                rt.nc, rt.names.bookings_stream, [rt.names.bookings_filter("*")], self._apply_booking, name="bookings",
                max_lag_s=max_lag,
            )
        self._tasks.append(asyncio.create_task(self._catch_up(), name="scheduler-catch-up"))
        log.info("scheduler.starting", router_id=self.router_id, pools=rt.pools, overlap=type(self.overlap).__name__)

    async def _catch_up(self) -> None:
        assert self.rt is not None and self.watcher is not None and self.follower is not None
        rt = self.rt
        # Workers first: replayed bookings are then applied against the same directory as live ones.
        self.watcher.start()
        await self.watcher.caught_up.wait()
        for pool in rt.pools:
            self._worker_gauges(pool)  # 0 is a value: "no live workers" must be visible, not absent
        self.follower.start()
        await self.follower.caught_up.wait()
        await self._note_tail()
        for pool in rt.pools:
            inflight = self.cfg.max_inflight
            self._subs.append(await serve(rt.nc, rt.names.select(pool), SelectRequest, self._handler(pool, self._select),
                                          queue=QUEUE, endpoint="scheduler.select", max_inflight=inflight,
                                          inline=lambda req: self.decides_inline(req.book)))
            self._subs.append(await serve(rt.nc, rt.names.booking(pool), CleanupRequest, self._handler(pool, self._booking),
                                          queue=QUEUE, endpoint="scheduler.booking", max_inflight=inflight))
            if self.selector.busy.enabled:
                self._subs.append(await rt.nc.subscribe(rt.names.load_subject(pool, "*"), cb=self._load_report_cb(pool)))
            state = rt.names.scheduler_state(pool)
            for subject in (state, f"{state}.{self.router_id}"):
                handler = self._handler(pool, self._state)
                self._subs.append(await serve(rt.nc, subject, StateRequest, handler, endpoint="scheduler.state"))
        self._tasks.append(asyncio.create_task(self._sweep(), name="scheduler-sweep"))
        self._ready = True
        log.info("scheduler.ready", router_id=self.router_id, applied_seq=self._applied_seq, workers=self._worker_count())

    async def stop(self) -> None:
        self._ready = False
        await unsubscribe_all(self._subs)
        await cancel_and_wait(self._tasks)
        if self.follower:
            await self.follower.stop()
        if self.watcher:
            await self.watcher.stop()
        if self.overlap:
            await self.overlap.stop()

    def ready(self) -> bool:
        """Caught up with discovery, bookings and (own replica) the index; connected; not lagging."""
        return (
            self._ready
            and (self.overlap is None or self.overlap.ready())
            and self.follower is not None
            and self.follower.ready()
            and self.watcher is not None
            and self.watcher.ready()
        )

    def status(self) -> dict[str, Any]:
        def summary(window: deque[float]) -> dict[str, Any]:
            lags = sorted(window)

            def q(p: float) -> float | None:
                return lags[min(len(lags) - 1, int(p * len(lags)))] if lags else None

            return {"n": len(lags), "p50": q(0.5), "p99": q(0.99), "max": lags[-1] if lags else None}

        return {
            "router_id": self.router_id,
            "applied_seq": self._applied_seq,
            "workers": self._worker_count(),
            "bookings": {pool: len(s.tracker.by_request) for pool, s in self.states.items()},
            # unconfirmed legs past their window (kept for a late prefill_complete) and cancelled bookings
            "dormant_legs": {pool: len(s.tracker.dormant) for pool, s in self.states.items()},
            "cancelled_bookings": {pool: len(s.tracker.cancels) for pool, s in self.states.items()},
            "booking_lag_ms": summary(self.lags_ms),
            "convergence_lag_ms": summary(self.remote_lags_ms),
            "sync_timeouts": self.sync_timeouts,
            "match_failures": self.match_failures,
            "predicted_blocks": self.predicted.size() if self.predicted else None,
            "followers": {
                "bookings": self.follower.state() if self.follower else None,
                "workers": self.watcher.follower.state() if self.watcher else None,
            },
        }

    def _handler(self, pool: str, fn: Any) -> Any:
        async def handle(req: Any, msg: Msg) -> Any:
            return await fn(pool, req)

        return handle

    # --- discovery ---------------------------------------------------------------------------

    def _worker_count(self) -> int:
        return len(self.watcher.directory.workers) if self.watcher else 0

    def _on_worker_put(self, record: WorkerRecord, is_new: bool) -> None:
        self._cand_cache.pop(record.pool, None)
        state = self.states.get(record.pool)
        if state is not None:
            state.worker_put(record.worker_id)
        self._worker_gauges(record.pool)
        if is_new and record.pool in self.queues:
            self._kick(record.pool)  # a new worker is capacity

    def _on_worker_remove(self, pool: str, worker_id: int) -> None:
        # Also for workers this replica never saw (delete markers replayed at start): see BookingState.
        self._cand_cache.pop(pool, None)
        state = self.states.get(pool)
        if state is not None:
            dropped = state.worker_removed(worker_id)
            if dropped:
                m.BOOKINGS_DROPPED_WORKER.inc(len(dropped))
                log.info("scheduler.worker_bookings_dropped", pool=pool, worker_id=worker_id, requests=len(dropped))
        if self.predicted is not None:
            self.predicted.drop_worker(pool, worker_id)
        self._worker_gauges(pool)
        if pool in self.queues:
            self._kick(pool)  # waiting selects pinned to it now fail with their error

    def _worker_gauges(self, pool: str) -> None:
        assert self.watcher is not None
        counts = {"aggregated": 0, "prefill": 0, "decode": 0}
        for record in self.watcher.directory.live(pool):
            counts[record.role] += 1
        for role, n in counts.items():
            m.WORKERS.labels(pool, role).set(n)

    def candidates(self, pool: str) -> list[Candidate]:
        assert self.watcher is not None
        cached = self._cand_cache.get(pool)
        if cached is None:
            entries = [e for (p, _), e in self.watcher.directory.workers.items() if p == pool]
            entries.sort(key=lambda e: e.record.worker_id)
            cached = [(e, candidates_of(e.record)) for e in entries]
            self._cand_cache[pool] = cached
        now = now_ms()
        out: list[Candidate] = []
        for entry, cands in cached:
            if entry.is_live(now):
                out.extend(cands)
        return out

    # --- worker load reports (busy detection) ----------------------------------------------

    def _load_report_cb(self, pool: str) -> Any:
        reports = self._reports.setdefault(pool, {})

        async def on_report(msg: Msg) -> None:
            try:
                rep: LoadReport = codec.decode(msg.data, LoadReport, codec.content_type_of(msg.headers))
            except SchemaError:
                m.LOAD_REPORTS_INVALID.inc()
                return
            if rep.active_decode_blocks is None and rep.active_prefill_tokens is None:
                return
            view = ReportedLoad(rep.active_decode_blocks or 0, rep.active_prefill_tokens or 0, rep.kv_total_blocks)
            reports[(rep.worker_id, rep.dp_rank)] = (view, now_ms())
            self._kick(pool)

        return on_report

    def fresh_reports(self, pool: str) -> dict[tuple[int, int], ReportedLoad]:
        reports = self._reports.get(pool)
        if not reports:
            return {}
        oldest = now_ms() - self.cfg.load_report_max_age_s * 1000
        return {t: view for t, (view, seen) in reports.items() if seen >= oldest}

    # --- bookings stream ---------------------------------------------------------------------

    def _apply_booking(self, seq: int, subject: str, data: bytes, headers: dict[str, str] | None) -> None:
        try:
            with consumer_span("bookings process", headers, **{"messaging.destination": subject}):
                self._apply_event(data)
        finally:
            self._applied_seq = seq
            waiters = self._waiters
            while waiters and waiters[0][0] <= seq:
                _, _, fut = heapq.heappop(waiters)
                if not fut.done():
                    fut.set_result(None)

    def _apply_event(self, data: bytes) -> None:
        try:
            ev: BookingEvent = codec.decode(data, BookingEvent)
        except SchemaError as exc:
            m.BOOKINGS_INVALID.inc()
            malformed("bookings", "schema", "scheduler.booking_invalid", error=str(exc)[:300], size=len(data))
            return
        state = self.states.get(ev.pool)
        if state is None:
            return  # a pool this replica does not serve
        now = now_ms()
        if ev.ts_ms:
            lag = max(now - ev.ts_ms, 0)
            self.lags_ms.append(lag)
            if ev.router_id != self.router_id:
                self.remote_lags_ms.append(lag)
            m.BOOKING_LAG.observe(lag / 1000.0)
        ok = state.apply(ev, now)
        m.BOOKINGS_APPLIED.labels(_KIND[type(ev)], "applied" if ok else "noop").inc()
        if ok and not isinstance(ev, BookingAdd):
            self._kick(ev.pool)  # load went down (or moved): a waiting select may fit now

    async def _wait_applied(self, seq: int) -> bool:
        if max(self._applied_seq, self._tail_floor) >= seq:
            return True
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiter_n += 1
        heapq.heappush(self._waiters, (seq, self._waiter_n, fut))
        try:
            await asyncio.wait_for(fut, self.cfg.booking_sync_timeout_s)
            return True
        except TimeoutError:
            self.sync_timeouts += 1
            log.warning("scheduler.sync_timeout", want_seq=seq, applied_seq=self._applied_seq)
            return False

    async def _note_tail(self) -> None:
        """After catch-up: if the stream's tail has aged out, nothing older is left to wait for."""
        assert self.rt is not None
        info = await self.rt.js.stream_info(self.rt.names.bookings_stream)
        if info.state.messages == 0:
            self._tail_floor = max(self._tail_floor, info.state.last_seq)

    async def _sync_to_tail(self) -> bool:
        """Apply the stream up to its last sequence as of now (bounded), e.g. before answering
        about a booking another replica may have made a few ms ago; False if that did not happen
        within `--booking-sync-timeout-s` (this replica's view is behind the stream)."""
        assert self.rt is not None
        info = await self.rt.js.stream_info(self.rt.names.bookings_stream)
        if info.state.messages == 0:
            self._tail_floor = max(self._tail_floor, info.state.last_seq)
            return True
        return await self._wait_applied(info.state.last_seq)

    async def _publish(self, pool: str, event: BookingEvent, type_: str, leg: str = "") -> int:
        return (await self._publish_ack(pool, event, type_, leg)).seq

    async def _publish_ack(self, pool: str, event: BookingEvent, type_: str, leg: str = "") -> Any:
        """Publish one booking event and return JetStream's ack.

        A stream without a leader (a cluster electing a new one after a node died) answers "no
        response from stream" at once; the same message (same `Nats-Msg-Id`, so never stored twice)
        is tried again for up to `--booking-sync-timeout-s`. After that, or after an ack timeout, the
        caller gets `timeout`: the bookings stream could not record it, retry later (before, the
        election answered `internal` and the free of a live booking was not retried)."""
        assert self.rt is not None
        subject = self.rt.names.bookings_subject(pool, self.router_id)
        data = codec.encode_json(event)
        msg_id = booking_msg_id(pool, event.request_id, type_, leg, event.booking_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.booking_sync_timeout_s
        delay = 0.05
        with producer_span("bookings publish", **{"messaging.destination": subject, "kvr.booking": type_}):
            while True:
                try:
                    return await self.rt.js.publish(subject, data, headers=inject_headers({"Nats-Msg-Id": msg_id}))
                except APIError as exc:
                    if exc.err_code == STREAM_FULL:  # discard new: the stream refuses, it never drops what it holds
                        m.BOOKINGS_REFUSED.inc()
                        raise ServiceError(ErrorCode.OVERLOADED, f"the bookings stream is full ({type_} not recorded); retry later") from None
                    raise
                except (NoStreamResponseError, NoRespondersError):
                    if loop.time() + delay > deadline:
                        m.BOOKINGS_UNRECORDED.inc()
                        raise ServiceError(ErrorCode.TIMEOUT, f"the bookings stream has no leader ({type_} not recorded); retry later") from None
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 0.5)
                except NatsTimeoutError:
                    m.BOOKINGS_UNRECORDED.inc()
                    raise ServiceError(ErrorCode.TIMEOUT, f"the bookings stream did not acknowledge the {type_} in time; retry later") from None

    # --- periodic ----------------------------------------------------------------------------

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.expiry_sweep_s)
            try:
                self.expire_now()
                self._load_gauges()
            except Exception:  # never let the sweeper die
                log.exception("scheduler.sweep_failed")

    def expire_now(self, now: int | None = None) -> None:
        now = now_ms() if now is None else now
        for pool, state in self.states.items():
            gone = state.tracker.expire(now)
            if gone:
                m.BOOKINGS_EXPIRED.inc(len(gone))
                log.info("scheduler.bookings_expired", pool=pool, requests=len(gone))
            if pool in self.queues:
                self._kick(pool)  # expired legs, and load reports aging out, free capacity
        if self.predicted is not None:
            self.predicted.expire(now)
            m.PREDICTED_BLOCKS.set(self.predicted.size())

    def _load_gauges(self) -> None:
        seen: set[tuple[str, str, str]] = set()
        for pool, state in self.states.items():
            tracker = state.tracker
            # Live workers without load too: an idle worker shows 0, not a gap in the panel.
            live = {(c.worker_id, c.dp_rank) for c in self.candidates(pool)} if self.watcher is not None else set()
            for target in sorted(live | set(tracker.targets())):
                labels = (pool, str(target[0]), str(target[1]))
                view = tracker.view(target)
                m.ACTIVE_BLOCKS.labels(*labels).set(view.active_blocks)
                m.ACTIVE_PREFILL_TOKENS.labels(*labels).set(view.active_prefill_tokens)
                m.ACTIVE_REQUESTS.labels(*labels).set(view.active_requests)
                seen.add(labels)
        for labels in self._gauge_labels - seen:
            for gauge in (m.ACTIVE_BLOCKS, m.ACTIVE_PREFILL_TOKENS, m.ACTIVE_REQUESTS):
                gauge.remove(*labels)
        self._gauge_labels = seen

    # --- endpoints ---------------------------------------------------------------------------

    def decides_inline(self, book: bool) -> bool:
        """Whether a select runs start to finish without suspending: no booking to publish, and the
        overlap comes from this process (embedded index or predicted cache), not over NATS."""
        return not book and self.overlap is not None and not isinstance(self.overlap, NatsOverlap)

    async def select(self, pool: str, req: SelectRequest) -> SelectReply:
        """In-process entry point (same semantics and errors as `scheduler.select`)."""
        return await self._select(pool, req)

    async def booking(self, pool: str, req: CleanupRequest) -> CleanupReply:
        """In-process entry point of `scheduler.booking`."""
        return await self._booking(pool, req)

    async def _select(self, pool: str, req: SelectRequest) -> SelectReply:
        if pool not in self.states:
            raise ServiceError(ErrorCode.NOT_FOUND, f"pool {pool!r} is not served by this scheduler")
        policy = req.policy or self.pool_policy.get(pool) or self.default_policy
        try:
            reply = await self._select_inner(pool, req, policy)
        except SelectionError as exc:
            self._decision_counter(pool, policy, exc.code).inc()
            raise ServiceError(exc.code, exc.message, exc.path) from None
        except ServiceError as exc:
            self._decision_counter(pool, policy, exc.code).inc()
            raise
        self._decision_counter(pool, policy, "ok").inc()
        return reply

    def _decision_counter(self, pool: str, policy: str, outcome: str) -> Any:
        key = (pool, policy, outcome)
        child = self._counters.get(key)
        if child is None:
            child = self._counters[key] = m.DECISIONS.labels(pool, policy, outcome)
        return child

    def pool_view(self, pool: str) -> PoolView:
        """Live candidates and the load; worker reports are added when scoring (`_select_inner`)."""
        return PoolView(pool, self.candidates(pool), self.states[pool].tracker)

    async def _select_inner(self, pool: str, req: SelectRequest, policy: Policy) -> SelectReply:
        """The decision (`decide.py`) with its I/O: the overlaps of a remote index are awaited, and a
        booking is published and applied from the stream before the answer."""
        t0 = time.perf_counter()
        view = self.pool_view(pool)
        p = self.decider.prepare(req, view)
        if p.booked is not None:
            return p.booked
        t1 = time.perf_counter()
        _PHASE["hashing"].observe(t1 - t0)
        overlaps = Overlaps()
        if p.wants_overlaps and view.candidates:
            source = self.overlap
            assert source is not None
            if isinstance(source, NatsOverlap):
                overlaps = await self._remote_overlaps(source, pool, p)
            else:
                overlaps = source.overlaps(pool, p.local, p.seq)
        t2 = time.perf_counter()
        _PHASE["match"].observe(t2 - t1)
        booking_id = (req.booking_id or new_booking_id()) if req.book else ""
        waiting: Waiting | None = None
        try:
            queue = self.queues[pool]
            if req.book and 0 < len(queue) < queue.capacity and req.queue_timeout_ms != 0:
                # Selects are waiting: take a place among them rather than overtaking them (the
                # dispatcher lets this one go at once if its own targets have room).
                waiting = self._waiting(pool, p, overlaps, now_ms())
                await self._queue_wait(pool, waiting, p, policy)
                self._admitting[pool] = None
                self._kick(pool)
            while True:
                now = now_ms()
                view = self.pool_view(pool)._replace(reported=self.fresh_reports(pool))  # as of now, after the index answered
                try:
                    out = self.decider.decide(p, overlaps, view, policy=policy, ts_ms=now, booking_id=booking_id)
                    break
                except SelectionError as exc:
                    if exc.code != ErrorCode.OVERLOADED:
                        raise
                    # Every eligible target is busy: a booking select waits for capacity in the
                    # admission queue (a dry run books nothing, so it is answered at once).
                    waiting = waiting or self._waiting(pool, p, overlaps, now)
                    if not req.book or waiting.deadline_ms <= now:
                        raise ServiceError(exc.code, exc.message, exc.path, self.cfg.queue_retry_after_s) from None
                    await self._queue_wait(pool, waiting, p, policy)
                    # Admitted: decide again. Nothing awaits from here to the booking's provisional
                    # add (`_book`), so the dispatcher, woken at the next loop turn, tests the next
                    # waiting select on a view that already holds this one's load.
                    self._admitting[pool] = None
                    self._kick(pool)
        finally:
            if waiting is not None:
                self._leave_queue(pool, waiting.ticket)
        t3 = time.perf_counter()
        _PHASE["scoring"].observe(t3 - t2)
        decision = out.decision
        if decision is None:
            return out.reply  # booked meanwhile by a concurrent select of this request id
        if self.predicted is not None:
            self.predicted.record(pool, decision.decode.candidate.target, p.seq, now)
            if decision.prefill is not None:
                self.predicted.record(pool, decision.prefill.candidate.target, p.seq, now)
        reply = out.reply
        if out.events:
            await self._book(pool, out.events, now)
            _PHASE["booking"].observe(time.perf_counter() - t3)
            reply = self.decider.settle(out, self.pool_view(pool))
        if p.local:
            hit = self._hit_ratio.get(pool) or self._hit_ratio.setdefault(pool, m.KV_HIT_RATE.labels(pool))
            hit.observe(min(decision.overlap_blocks / len(p.local), 1.0))
        return reply

    # --- admission queue (services/scheduler/admission.py holds the rule) ----------------------

    def _waiting(self, pool: str, p: Prepared, overlaps: Overlaps, now: int) -> Waiting:
        """A queue ticket for `p`: its priorities, prompt and best cached prefix (Dynamo's WSPT
        input), and its deadline (the select's `queue_timeout_ms`, else --queue-timeout-s)."""
        req = p.request
        timeout_ms = req.queue_timeout_ms if req.queue_timeout_ms is not None else self.cfg.routing.queue_timeout_ms
        self._tickets += 1
        cached = max(overlaps.device.values(), default=0) * p.block_size
        return Waiting(self._tickets, req.request_id, now, now + timeout_ms, req.strict_priority, req.priority, p.isl, cached)

    async def _queue_wait(self, pool: str, waiting: Waiting, p: Prepared, policy: Policy) -> None:
        """Wait in the pool's admission queue until the dispatcher lets `waiting` through (then the
        caller decides again), or answer `overloaded` with a retry hint: queue full, evicted by a
        better-ranked request, or its deadline passed."""
        queue = self.queues[pool]
        hint = self.cfg.queue_retry_after_s
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        if waiting.ticket not in queue:
            offered = queue.offer(waiting)
            if not offered.queued:
                m.QUEUE_WAIT.labels(pool, "full").observe(0.0)
                raise ServiceError(ErrorCode.OVERLOADED, f"every eligible worker is busy and the admission queue is full ({len(queue)})",
                                   retry_after_s=hint)
            if offered.evicted is not None:
                evicted = self._queued[pool].pop(offered.evicted.ticket, None)
                if evicted is not None and not evicted[2].done():
                    evicted[2].set_result(False)
        self._queued[pool][waiting.ticket] = (p, policy, fut)
        m.QUEUE_DEPTH.labels(pool).set(len(queue))
        self._kick(pool)
        remaining = max(waiting.deadline_ms - now_ms(), 0) / 1000.0
        try:
            admitted = await asyncio.wait_for(asyncio.shield(fut), remaining)
        except TimeoutError:
            admitted = fut.done() and fut.result()
            if not admitted:
                m.QUEUE_WAIT.labels(pool, "timeout").observe(max(now_ms() - waiting.enqueued_ms, 0) / 1000.0)
                raise ServiceError(
                    ErrorCode.OVERLOADED, f"every eligible worker stayed busy for the queue deadline ({remaining:.3f} s)", retry_after_s=hint
                ) from None
        if not admitted:
            m.QUEUE_WAIT.labels(pool, "evicted").observe(max(now_ms() - waiting.enqueued_ms, 0) / 1000.0)
            raise ServiceError(ErrorCode.OVERLOADED, "evicted from the full admission queue by a higher-ranked request", retry_after_s=hint)
        m.QUEUE_WAIT.labels(pool, "admitted").observe(max(now_ms() - waiting.enqueued_ms, 0) / 1000.0)

    def _leave_queue(self, pool: str, ticket: int) -> None:
        self.queues[pool].remove(ticket)
        self._queued[pool].pop(ticket, None)
        if self._admitting.get(pool) == ticket:
            self._admitting[pool] = None
            self._kick(pool)
        m.QUEUE_DEPTH.labels(pool).set(len(self.queues[pool]))

    def _kick(self, pool: str) -> None:
        """Capacity may have changed (a booking applied, a report, a worker, the sweep): test the
        waiting requests soon (once per loop turn, however many kicks)."""
        if pool in self._kicked or not self.queues.get(pool) or self._admitting.get(pool) is not None:
            return
        self._kicked.add(pool)
        asyncio.get_running_loop().call_soon(self._dispatch, pool)

    def _dispatch(self, pool: str) -> None:
        """Let the first waiting request that has capacity now go (one at a time: the next is
        tested once this one has decided and its load is in the view)."""
        self._kicked.discard(pool)
        if self._admitting.get(pool) is not None:
            return
        queue, queued = self.queues[pool], self._queued[pool]
        view = self.pool_view(pool)._replace(reported=self.fresh_reports(pool))

        def admissible(w: Waiting) -> bool:
            entry = queued.get(w.ticket)
            if entry is None:
                return True  # its waiter is gone: let it leave
            p, policy, _ = entry
            try:
                return self.decider.has_capacity(p, view, policy)
            except SelectionError:
                return True  # no longer eligible at all (worker gone): it decides again and gets its error

        w = queue.next_admissible(admissible)
        m.QUEUE_DEPTH.labels(pool).set(len(queue))
        if w is None:
            return
        entry = queued.pop(w.ticket, None)
        if entry is None or entry[2].done():
            self._kick(pool)
            return
        self._admitting[pool] = w.ticket
        entry[2].set_result(True)

    async def _remote_overlaps(self, source: NatsOverlap, pool: str, p: Prepared) -> Overlaps:
        try:
            return await source.overlaps(pool, p.local, p.seq)
        except Exception as exc:  # noqa: BLE001 - no responders, timeout, error reply, closed connection
            # No index answer: decide on load alone rather than fail the request.
            self.match_failures += 1
            log.warning("scheduler.match_failed", pool=pool, error=str(exc))
            return Overlaps()

    async def _book(self, pool: str, events: tuple[BookingAdd, ...], ts: int) -> None:
        """Publish a decision's adds and wait until this replica applied them from the stream.

        They are applied provisionally *before* the first await (`BookingState.book`): selects that
        run while this one waits for the stream must see this load, or a burst of requests all pick
        the same cheapest worker (measured with the offline simulator: mean TTFT 4× worse on the
        Mooncake conversation trace's 3-second bursts). The stream's copy replaces them."""
        state = self.states[pool]
        mine = state.book(events, ts)
        pubs = [self._publish_ack(pool, ev, "add", ev.leg) for ev in events]
        t0 = time.perf_counter()
        try:
            acks = await asyncio.gather(*pubs)
        except BaseException:
            # Not (known to be) in the stream: take the provisional legs back. If a publish did land
            # after all, its stream copy re-adds the booking like on every other replica.
            state.take_back(mine)
            raise
        # JetStream dropped a duplicate (this booking attempt was published before, e.g. by another
        # replica): the stream will not deliver it again, so it must not stay here only.
        state.take_back([ev for ev, ack in zip(events, acks, strict=True) if ack.duplicate])
        t1 = time.perf_counter()
        _PHASE["booking_publish"].observe(t1 - t0)
        await self._wait_applied(max(ack.seq for ack in acks))
        _PHASE["booking_apply"].observe(time.perf_counter() - t1)

    async def _booking(self, pool: str, req: CleanupRequest) -> CleanupReply:
        state = self.states.get(pool)
        if state is None:
            raise ServiceError(ErrorCode.NOT_FOUND, f"pool {pool!r} is not served by this scheduler")
        tracker = state.tracker
        ts, bookings = self._bookings_of(tracker, req)
        synced = True
        if not bookings:
            # Another replica (or a select of this one, whose add is in flight) may have booked it a
            # few ms ago: the stream's tail as of now includes that add.
            synced = await self._sync_to_tail()
            ts, bookings = self._bookings_of(tracker, req)
        if not bookings:
            if req.phase == "free" and req.booking_id:
                # A booking not (yet) in the stream: publish the free anyway. Every replica then
                # ignores a later add of it (a select that books after its caller gave up).
                ev = BookingFree(request_id=req.request_id, router_id=self.router_id, pool=pool, ts_ms=ts,
                                 booking_id=req.booking_id)
                await self._wait_applied(await self._publish(pool, ev, "free"))
            elif not synced:
                # This replica is behind the stream (its feed stalled, e.g. right after a NATS
                # restart): the booking may be in what it has not applied. "Unknown" would make the
                # caller drop a free whose booking then stays for its whole TTL; ask for a retry.
                m.BOOKING_UPDATES_BEHIND.inc()
                raise ServiceError(ErrorCode.TIMEOUT, f"this replica has not applied the bookings stream up to now; retry the {req.phase}")
            return CleanupReply(request_id=req.request_id, known=False)
        # One event per booking (usually one), stamped with the instant its legs were seen alive.
        events: list[BookingEvent] = []
        for b in bookings:
            base = dict(request_id=req.request_id, router_id=self.router_id, pool=pool, ts_ms=ts, booking_id=b)
            if req.phase == "move":
                events.append(BookingMove(worker_id=req.worker_id, dp_rank=req.dp_rank or 0, **base))  # type: ignore[arg-type]
            else:
                events.append((BookingPrefillComplete if req.phase == "prefill_complete" else BookingFree)(**base))  # type: ignore[arg-type]
        # One move per target and booking in the de-duplication window.
        leg = f"{req.worker_id}.{req.dp_rank or 0}" if req.phase == "move" else ""
        acks = await asyncio.gather(*(self._publish_ack(pool, ev, req.phase, leg) for ev in events))
        await self._wait_applied(max(ack.seq for ack in acks))
        return CleanupReply(request_id=req.request_id, known=True)

    def _bookings_of(self, tracker: LoadTracker, req: CleanupRequest) -> tuple[int, list[str]]:
        """(now, the request's bookings that the stream holds and that are alive now)."""
        now = now_ms()
        self.expire_now(now)
        found = tracker.bookings_of(req.request_id, provisional=False)
        return now, [b for b in found if not req.booking_id or b == req.booking_id]

    def digest(self) -> dict[str, Any]:
        """`GET /digest`: per pool the load view's digest (as in `scheduler.state`) and its booked
        requests, at the bookings stream position `applied_seq`; with an index replica, its digests
        too (`IndexerApp.digest`). Replicas that applied the same streams report the same values."""
        pools = {}
        for pool in self.states:
            state = self.export_state(pool)
            pools[pool] = {"load": state.digest, "bookings": len(state.bookings)}
        out: dict[str, Any] = {"router_id": self.router_id, "applied_seq": self._applied_seq, "pools": pools}
        if isinstance(self.overlap, EmbeddedOverlap):
            out["index"] = self.overlap.replica.digest()
        return out

    async def _state(self, pool: str, req: StateRequest) -> StateReply:
        return self.export_state(pool)

    def export_state(self, pool: str) -> StateReply:
        self.expire_now()
        tracker = self.states[pool].tracker
        workers = sorted({c.worker_id for c in self.candidates(pool)})
        known = set(workers)
        loads = []
        for target in tracker.targets():
            if target[0] not in known:
                continue
            v = tracker.view(target)
            loads.append(WorkerLoad(worker_id=target[0], dp_rank=target[1], active_prefill_tokens=v.active_prefill_tokens,
                                    active_blocks=v.active_blocks, active_requests=v.active_requests))
        bookings = sorted({leg.request_id for leg in tracker.legs.values() if leg.target[0] in known})
        return StateReply(
            router_id=self.router_id,
            stream_seq=self._applied_seq,
            loads=loads,
            bookings=bookings,
            workers=workers,
            digest=tracker.digest(known),
        )
