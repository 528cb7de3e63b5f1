"""The scheduler's imperative shell: discovery + bookings stream in, select/booking/state out.

Every replica applies every booking from KVR_BOOKINGS (its own too) in stream order, so all
replicas converge on one load view. A replica that books a request replies only after it has
applied its own booking from the stream, so its next decision already sees that load.
"""

from __future__ import annotations

import asyncio
import heapq
import random
import time
import uuid
from collections import deque
from types import SimpleNamespace
from typing import Any

from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import APIError, NoStreamResponseError

from schemas import codec
from schemas.api import (
    CleanupReply,
    CleanupRequest,
    SelectReply,
    SelectRequest,
    StateReply,
    StateRequest,
    Target as WireTarget,
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
from schemas.hashing import local_block_hashes, salt_seed, sequence_hashes
from services.runtime.badinput import malformed
from services.runtime.follower import StreamFollower
from services.runtime.logs import get_logger
from services.runtime.responder import ServiceError, serve, unsubscribe_all
from services.runtime.service import Runtime
from services.runtime.tracing import consumer_span, inject_headers, producer_span
from services.runtime.workers import WorkerEntry, WorkerWatcher, now_ms

from . import metrics as m
from .candidates import Candidate, candidates_of
from services.runtime.push_follower import PushFollower
from services.runtime.tasks import cancel_and_wait
from .load import PREFILL_LEG, LoadTracker
from .overlap import EmbeddedOverlap, NatsOverlap, OverlapSource, PredictedCache, PredictedOverlap
from .settings import SETTINGS
from .selector import (
    BusyThresholds,
    CostConfig,
    Decision,
    Overlaps,
    ReportedLoad,
    SelectionError,
    SelectionInput,
    Selector,
)

log = get_logger("kvr.scheduler")
QUEUE = "scheduler"
STREAM_FULL = 10077  # JetStream error code of a publish refused by a full discard-new stream
LAG_WINDOW = 20_000
_PHASE = {
    phase: m.PHASE_SECONDS.labels(phase)
    for phase in ("hashing", "match", "scoring", "booking", "booking_publish", "booking_apply")
}


def _policy_table(entries: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in entries:
        pool, sep, policy = item.partition("=")
        if not sep or policy not in ("kv", "round_robin", "random", "least_loaded"):
            raise ValueError(f"bad --pool-policy entry {item!r} (want pool=kv|round_robin|random|least_loaded)")
        out[pool] = policy
    return out


def with_defaults(cfg: SimpleNamespace) -> SimpleNamespace:
    """The config, plus defaults for scheduler settings an embedding service's namespace lacks."""
    values = {s.name: (list(s.default) if isinstance(s.default, list) else s.default) for s in SETTINGS}
    values.update(vars(cfg))
    return SimpleNamespace(**values)


class SchedulerApp:
    """Usable standalone (`kvr scheduler`) or embedded (the EPP bridge's one-process mode): construct
    with a resolved config, `await start(rt)`, then call `select()` / `booking()` directly."""

    def __init__(self, cfg: SimpleNamespace) -> None:
        cfg = with_defaults(cfg)
        self.cfg = cfg
        self.router_id: str = cfg.router_id or f"sched-{uuid.uuid4().hex[:10]}"
        self.cost = CostConfig(
            overlap_score_credit=cfg.overlap_score_credit,
            prefill_load_scale=cfg.prefill_load_scale,
            host_cache_hit_weight=cfg.host_cache_hit_weight,
            disk_cache_hit_weight=cfg.disk_cache_hit_weight,
            temperature=cfg.router_temperature,
        )
        busy = BusyThresholds(
            active_decode_blocks=cfg.active_decode_blocks_threshold,
            active_prefill_tokens=cfg.active_prefill_tokens_threshold,
            active_prefill_tokens_frac=cfg.active_prefill_tokens_threshold_frac,
        )
        rng = random.Random(cfg.seed) if cfg.seed >= 0 else random.Random()
        self.selector = Selector(busy, rng)
        self.pool_policy = _policy_table(list(getattr(cfg, "pool_policy", []) or []))
        self.ttl_ms = int(cfg.booking_ttl_s * 1000)
        self.unconfirmed_ttl_ms = int(cfg.booking_unconfirmed_ttl_s * 1000)
        self.trackers: dict[str, LoadTracker] = {}
        self.predicted: PredictedCache | None = None
        self.overlap: OverlapSource | None = None
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
        self._removed: dict[str, set[int]] = {}
        # (pool, request_id, booking_id, leg) → our own add, applied before the stream delivers it (see _book)
        self._provisional: dict[tuple[str, str, str, str], BookingAdd] = {}
        self.match_failures = 0

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self, rt: Runtime) -> None:
        self.rt = rt
        self.trackers = {pool: LoadTracker(self.ttl_ms, self.unconfirmed_ttl_ms) for pool in rt.pools}
        if self.cfg.no_kv_events:
            self.predicted = PredictedCache(int(self.cfg.approx_ttl_s * 1000), self.cfg.approx_max_blocks, self.cfg.block_size)
            self.overlap = PredictedOverlap(self.predicted, now_ms)
        elif self.cfg.embedded_indexer:
            embedded = EmbeddedOverlap(self.cfg)
            await embedded.start(rt)
            self.overlap = embedded
        else:
            self.overlap = NatsOverlap(rt.nc, rt.names, self.cfg.match_timeout_s)
        max_lag = float(getattr(self.cfg, "max_ready_lag_s", 0.0))
        self.watcher = WorkerWatcher(
            rt.nc, rt.names.workers_bucket, rt.pools, on_put=self._on_worker_put, on_remove=self._on_worker_remove,
            notify_unknown_removals=True, max_lag_s=max_lag,
        )  # fmt: skip
        if self.cfg.bookings_feed == "push":
            self.follower = PushFollower(
                rt.nc, rt.names.bookings_stream, rt.names.bookings_filter("*"), self._apply_booking, max_lag_s=max_lag
            )
        else:
            self.follower = StreamFollower(
                rt.nc, rt.names.bookings_stream, [rt.names.bookings_filter("*")], self._apply_booking, name="bookings",
                max_lag_s=max_lag,
            )  # fmt: skip
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
            self._subs.append(await serve(rt.nc, rt.names.select(pool), SelectRequest, self._handler(pool, self._select),
                                          queue=QUEUE, endpoint="scheduler.select", max_inflight=self.cfg.max_inflight,
                                          inline=lambda req: self.decides_inline(req.book)))  # fmt: skip
            self._subs.append(await serve(rt.nc, rt.names.booking(pool), CleanupRequest, self._handler(pool, self._booking),
                                          queue=QUEUE, endpoint="scheduler.booking", max_inflight=self.cfg.max_inflight))  # fmt: skip
            if self.selector.busy.enabled:
                self._subs.append(await rt.nc.subscribe(rt.names.load_subject(pool, "*"), cb=self._load_report_cb(pool)))
            state = rt.names.scheduler_state(pool)
            for subject in (state, f"{state}.{self.router_id}"):
                self._subs.append(await serve(rt.nc, subject, StateRequest, self._handler(pool, self._state), endpoint="scheduler.state"))
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
            "bookings": {pool: len(t.by_request) for pool, t in self.trackers.items()},
            # unconfirmed legs past their window (kept for a late prefill_complete) and cancelled bookings
            "dormant_legs": {pool: len(t.dormant) for pool, t in self.trackers.items()},
            "cancelled_bookings": {pool: len(t.cancels) for pool, t in self.trackers.items()},
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
        self._removed.get(record.pool, set()).discard(record.worker_id)
        self._worker_gauges(record.pool)

    def _on_worker_remove(self, pool: str, worker_id: int) -> None:
        # Remember the removal (also of workers this replica never saw: delete markers replayed at
        # start) so a booking add for it that arrives later is ignored here as on every replica
        # that applied the add before the removal and then dropped it.
        self._cand_cache.pop(pool, None)
        self._removed.setdefault(pool, set()).add(worker_id)
        tracker = self.trackers.get(pool)
        if tracker is not None:
            dropped = tracker.drop_worker(worker_id)
            if dropped:
                m.BOOKINGS_DROPPED_WORKER.inc(len(dropped))
                log.info("scheduler.worker_bookings_dropped", pool=pool, worker_id=worker_id, requests=len(dropped))
        if self.predicted is not None:
            self.predicted.drop_worker(pool, worker_id)
        self._worker_gauges(pool)

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
            if entry.age_ms(now) < entry.record.ttl_s * 1000.0:
                out.extend(cands)
        return out

    # --- worker load reports (busy detection) ----------------------------------------------

    def _load_report_cb(self, pool: str) -> Any:
        reports = self._reports.setdefault(pool, {})

        async def on_report(msg: Msg) -> None:
            try:
                rep = codec.decode(msg.data, LoadReport, codec.content_type_of(msg.headers))
            except SchemaError:
                m.LOAD_REPORTS_INVALID.inc()
                return
            if rep.active_decode_blocks is None and rep.active_prefill_tokens is None:
                return
            view = ReportedLoad(rep.active_decode_blocks or 0, rep.active_prefill_tokens or 0, rep.kv_total_blocks)
            reports[(rep.worker_id, rep.dp_rank)] = (view, now_ms())

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
            ev = codec.decode(data, BookingEvent)
        except SchemaError as exc:
            m.BOOKINGS_INVALID.inc()
            malformed("bookings", "schema", "scheduler.booking_invalid", error=str(exc)[:300], size=len(data))
            return
        tracker = self.trackers.get(ev.pool)
        if tracker is None:
            return  # a pool this replica does not serve
        now = now_ms()
        if ev.ts_ms:
            lag = max(now - ev.ts_ms, 0)
            self.lags_ms.append(lag)
            if ev.router_id != self.router_id:
                self.remote_lags_ms.append(lag)
            m.BOOKING_LAG.observe(lag / 1000.0)
        if isinstance(ev, BookingAdd):
            if self._provisional.pop((ev.pool, ev.request_id, ev.booking_id, ev.leg), None) is not None:
                # The stream's copy is authoritative (a free may have cancelled the booking before
                # it landed): replace ours with it.
                tracker.discard_leg(ev.request_id, ev.leg, ev.booking_id)
            removed = self._removed.get(ev.pool)
            ok = not (removed and ev.worker_id in removed) and tracker.add(ev, now)
            kind = "add"
        elif isinstance(ev, BookingPrefillComplete):
            ok = tracker.prefill_complete(ev.request_id, ev.booking_id, ev.ts_ms, now)
            kind = "prefill_complete"
        elif isinstance(ev, BookingMove):
            removed = self._removed.get(ev.pool)
            target = (ev.worker_id, ev.dp_rank)
            ok = not (removed and ev.worker_id in removed) and tracker.move(ev.request_id, target, booking_id=ev.booking_id)
            kind = "move"
        else:
            ok = tracker.free(ev.request_id, ev.booking_id, ev.ts_ms, now)
            kind = "free"
        m.BOOKINGS_APPLIED.labels(kind, "applied" if ok else "noop").inc()

    async def _wait_applied(self, seq: int) -> bool:
        if max(self._applied_seq, self._tail_floor) >= seq:
            return True
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiter_n += 1
        heapq.heappush(self._waiters, (seq, self._waiter_n, fut))
        try:
            await asyncio.wait_for(fut, self.cfg.booking_sync_timeout_s)
            return True
        except asyncio.TimeoutError:
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
                        raise ServiceError("overloaded", f"the bookings stream is full ({type_} not recorded); retry later") from None
                    raise
                except (NoStreamResponseError, NoRespondersError):
                    if loop.time() + delay > deadline:
                        m.BOOKINGS_UNRECORDED.inc()
                        raise ServiceError("timeout", f"the bookings stream has no leader ({type_} not recorded); retry later") from None
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 0.5)
                except NatsTimeoutError:
                    m.BOOKINGS_UNRECORDED.inc()
                    raise ServiceError("timeout", f"the bookings stream did not acknowledge the {type_} in time; retry later") from None

    # --- periodic ----------------------------------------------------------------------------

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.expiry_sweep_s)
            try:
                self.expire_now()
                self._load_gauges()
            except Exception:  # noqa: BLE001 - never let the sweeper die
                log.exception("scheduler.sweep_failed")

    def expire_now(self, now: int | None = None) -> None:
        now = now_ms() if now is None else now
        for pool, tracker in self.trackers.items():
            gone = tracker.expire(now)
            if gone:
                m.BOOKINGS_EXPIRED.inc(len(gone))
                log.info("scheduler.bookings_expired", pool=pool, requests=len(gone))
        if self.predicted is not None:
            self.predicted.expire(now)
            m.PREDICTED_BLOCKS.set(self.predicted.size())

    def _load_gauges(self) -> None:
        seen: set[tuple[str, str, str]] = set()
        for pool, tracker in self.trackers.items():
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

    def _wire_target(self, c: Candidate) -> WireTarget:
        return WireTarget(worker_id=c.worker_id, dp_rank=c.dp_rank, pod_name=c.pod_name, endpoint=c.endpoint)

    def _existing_reply(self, pool: str, req: SelectRequest, tracker: LoadTracker, block_size: int) -> SelectReply | None:
        """A retried select of a request that is already booked answers with the booked targets
        (of its oldest booking, if concurrent selects on several replicas booked it more than once)."""
        booked = tracker.legs_of(req.request_id)
        if not booked:
            return None
        booking_id = booked[0].booking_id
        legs = {leg.leg: leg for leg in booked if leg.booking_id == booking_id}
        decode = legs.get("")
        if decode is None:
            return None
        by_target = {c.target: c for c in self.candidates(pool)}

        def wire(target: tuple[int, int]) -> WireTarget:
            c = by_target.get(target)
            return self._wire_target(c) if c else WireTarget(worker_id=target[0], dp_rank=target[1])

        prefill = legs.get(PREFILL_LEG)
        return SelectReply(
            decode=wire(decode.target),
            prefill=wire(prefill.target) if prefill else None,
            overlap_blocks=(prefill or decode).overlap_blocks,
            isl_tokens=decode.isl_tokens,
            block_size=block_size,
            cost=0.0,
            mode="disaggregated" if prefill else "aggregated",
            policy="booked",
            request_id=req.request_id,
            booking_id=booking_id,
        )

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
        if pool not in self.trackers:
            raise ServiceError("not_found", f"pool {pool!r} is not served by this scheduler")
        policy = req.policy or self.pool_policy.get(pool) or self.cfg.selection_policy
        try:
            reply = await self._select_inner(pool, req, policy)
        except SelectionError as exc:
            self._decision_counter(pool, policy, exc.code).inc()
            raise ServiceError(exc.code, exc.message) from None
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

    async def _select_inner(self, pool: str, req: SelectRequest, policy: str) -> SelectReply:
        t0 = time.perf_counter()
        tracker = self.trackers[pool]
        cands = self.candidates(pool)
        block_size = cands[0].block_size if cands else self.cfg.block_size
        limit = self.cfg.max_request_tokens
        if req.token_ids is not None and len(req.token_ids) > limit:
            raise ServiceError("invalid_request", f"{len(req.token_ids)} tokens exceed the limit of {limit}", "$.token_ids")
        if req.block_hashes is not None and len(req.block_hashes) * block_size > limit:
            raise ServiceError(
                "invalid_request", f"{len(req.block_hashes)} blocks exceed the limit of {limit} tokens", "$.block_hashes"
            )
        if req.isl_tokens is not None and req.isl_tokens > limit:
            raise ServiceError("invalid_request", f"isl_tokens {req.isl_tokens} exceeds the limit of {limit}", "$.isl_tokens")
        if req.book and tracker.is_active(req.request_id):
            existing = self._existing_reply(pool, req, tracker, block_size)
            if existing is not None:
                return existing
        if req.token_ids is not None:
            local = local_block_hashes(req.token_ids, block_size, salt_seed(req.lora_name, req.cache_salt))
            isl = req.isl_tokens if req.isl_tokens is not None else len(req.token_ids)
        else:
            local = list(req.block_hashes or [])
            isl = req.isl_tokens if req.isl_tokens is not None else len(local) * block_size
        seq = sequence_hashes(local)
        t1 = time.perf_counter()
        _PHASE["hashing"].observe(t1 - t0)

        overlaps = Overlaps()
        if local and cands:
            assert self.overlap is not None
            try:
                overlaps = await self.overlap.overlaps(pool, local, seq)
            except Exception as exc:  # noqa: BLE001 - no responders, timeout, error reply, closed connection
                # No index answer: decide on load alone rather than fail the request.
                self.match_failures += 1
                log.warning("scheduler.match_failed", pool=pool, error=str(exc))
        t2 = time.perf_counter()
        _PHASE["match"].observe(t2 - t1)

        constraints = req.routing_constraints
        inp = SelectionInput(
            isl_tokens=isl,
            block_size=block_size,
            hashes=seq,
            allowed_worker_ids=frozenset(req.allowed_worker_ids) if req.allowed_worker_ids is not None else None,
            allowed_targets=frozenset(map(tuple, req.allowed_targets)) if req.allowed_targets is not None else None,  # type: ignore[arg-type]
            fallbacks=req.fallbacks,
            pinned_worker_id=req.pinned_worker_id,
            pinned_dp_rank=req.pinned_dp_rank,
            required_taints=frozenset(constraints.required_taints) if constraints else frozenset(),
            preferred_taints=dict(constraints.preferred_taints) if constraints else {},
            mode=req.mode,
            policy=policy,
            cost=self.cost.with_overrides(req.overrides),
            reported=self.fresh_reports(pool),
        )
        decision = self.selector.select(cands, tracker, overlaps, inp)
        t3 = time.perf_counter()
        _PHASE["scoring"].observe(t3 - t2)
        if req.book and tracker.is_active(req.request_id):
            # A concurrent select of the same request id on this replica booked it meanwhile.
            existing = self._existing_reply(pool, req, tracker, block_size)
            if existing is not None:
                return existing

        if self.predicted is not None:
            now = now_ms()
            self.predicted.record(pool, decision.decode.candidate.target, seq, now)
            if decision.prefill is not None:
                self.predicted.record(pool, decision.prefill.candidate.target, seq, now)
        booking_id = ""
        if req.book:
            booking_id = req.booking_id or new_booking_id()
            await self._book(pool, req, decision, isl, seq, block_size, booking_id)
            _PHASE["booking"].observe(time.perf_counter() - t3)
            # Another replica may have booked the same attempt first (JetStream dropped our add as
            # a duplicate), or a free cancelled it before it landed: answer with what is booked.
            booked = self._existing_reply(pool, req, tracker, block_size)
            if booked is None or booked.booking_id != booking_id:
                booking_id = ""
            elif (booked.decode.worker_id, booked.decode.dp_rank) != decision.decode.candidate.target:
                return booked
        if local:
            hit = self._hit_ratio.get(pool) or self._hit_ratio.setdefault(pool, m.KV_HIT_RATE.labels(pool))
            hit.observe(min(decision.overlap_blocks / len(local), 1.0))
        return SelectReply(
            decode=self._wire_target(decision.decode.candidate),
            prefill=self._wire_target(decision.prefill.candidate) if decision.prefill else None,
            overlap_blocks=decision.overlap_blocks,
            isl_tokens=isl,
            block_size=block_size,
            cost=decision.cost,
            mode=decision.mode,  # type: ignore[arg-type]
            policy=decision.policy,
            fallbacks=[self._wire_target(f.candidate) for f in decision.fallbacks],
            request_id=req.request_id,
            booking_id=booking_id,
        )

    async def _book(
        self, pool: str, req: SelectRequest, d: Decision, isl: int, seq: list[int], block_size: int, booking_id: str
    ) -> None:
        ts = now_ms()
        common = dict(
            request_id=req.request_id, router_id=self.router_id, pool=pool, ts_ms=ts, isl_tokens=isl, booking_id=booking_id,
            sequence_hashes=seq, expected_output_tokens=req.expected_output_tokens, block_size=block_size,
        )  # fmt: skip
        events: list[BookingAdd] = []
        if d.prefill is not None:
            c = d.prefill.candidate
            events.append(BookingAdd(worker_id=c.worker_id, dp_rank=c.dp_rank, overlap_blocks=d.prefill.overlap_blocks,
                                     leg=PREFILL_LEG, track_prefill_tokens=True, **common))  # type: ignore[arg-type]  # fmt: skip
        c = d.decode.candidate
        events.append(BookingAdd(worker_id=c.worker_id, dp_rank=c.dp_rank, overlap_blocks=d.decode.overlap_blocks,
                                 leg="", track_prefill_tokens=d.prefill is None, **common))  # type: ignore[arg-type]  # fmt: skip
        # Apply our own booking provisionally *before* the first await: selects that run while this
        # one waits for the stream must see this load, or a burst of requests all pick the same
        # cheapest worker (measured with the offline simulator: mean TTFT 4× worse on the Mooncake
        # conversation trace's 3-second bursts). The stream's copy replaces it when it arrives.
        tracker = self.trackers[pool]
        mine = [ev for ev in events if tracker.add(ev, ts, provisional=True)]
        for ev in mine:
            self._provisional[(pool, ev.request_id, booking_id, ev.leg)] = ev
        pubs = [self._publish_ack(pool, ev, "add", ev.leg) for ev in events]
        t0 = time.perf_counter()

        def take_back(ev: BookingAdd) -> None:
            if self._provisional.pop((pool, ev.request_id, booking_id, ev.leg), None) is not None:
                tracker.discard_leg(ev.request_id, ev.leg, booking_id)

        try:
            acks = await asyncio.gather(*pubs)
        except BaseException:
            # Not (known to be) in the stream: take the provisional legs back. If a publish did land
            # after all, its stream copy re-adds the booking like on every other replica.
            for ev in mine:
                take_back(ev)
            raise
        for ev, ack in zip(events, acks):
            if ack.duplicate:
                # JetStream dropped it (this booking attempt was published before, e.g. by another
                # replica): the stream will not deliver it again, so it must not stay here only.
                take_back(ev)
        t1 = time.perf_counter()
        _PHASE["booking_publish"].observe(t1 - t0)
        await self._wait_applied(max(ack.seq for ack in acks))
        _PHASE["booking_apply"].observe(time.perf_counter() - t1)

    async def _booking(self, pool: str, req: CleanupRequest) -> CleanupReply:
        tracker = self.trackers.get(pool)
        if tracker is None:
            raise ServiceError("not_found", f"pool {pool!r} is not served by this scheduler")
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
                                 booking_id=req.booking_id)  # fmt: skip
                await self._wait_applied(await self._publish(pool, ev, "free"))
            elif not synced:
                # This replica is behind the stream (its feed stalled, e.g. right after a NATS
                # restart): the booking may be in what it has not applied. "Unknown" would make the
                # caller drop a free whose booking then stays for its whole TTL; ask for a retry.
                m.BOOKING_UPDATES_BEHIND.inc()
                raise ServiceError("timeout", f"this replica has not applied the bookings stream up to now; retry the {req.phase}")
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
        for pool in self.trackers:
            state = self.export_state(pool)
            pools[pool] = {"load": state.digest, "bookings": len(state.bookings)}
        out: dict[str, Any] = {"router_id": self.router_id, "applied_seq": self._applied_seq, "pools": pools}
        if isinstance(self.overlap, EmbeddedOverlap):
            out["index"] = self.overlap.app.digest()
        return out

    async def _state(self, pool: str, req: StateRequest) -> StateReply:
        return self.export_state(pool)

    def export_state(self, pool: str) -> StateReply:
        self.expire_now()
        tracker = self.trackers[pool]
        workers = sorted({c.worker_id for c in self.candidates(pool)})
        known = set(workers)
        loads = []
        for target in tracker.targets():
            if target[0] not in known:
                continue
            v = tracker.view(target)
            loads.append(WorkerLoad(worker_id=target[0], dp_rank=target[1], active_prefill_tokens=v.active_prefill_tokens,
                                    active_blocks=v.active_blocks, active_requests=v.active_requests))  # fmt: skip
        bookings = sorted({leg.request_id for leg in tracker.legs.values() if leg.target[0] in known})
        return StateReply(
            router_id=self.router_id,
            stream_seq=self._applied_seq,
            loads=loads,
            bookings=bookings,
            workers=workers,
            digest=tracker.digest(known),
        )
