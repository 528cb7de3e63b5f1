"""Offline routing-quality simulator: a discrete-event replay in simulated time (Dynamo's "DynoSim").

The online replay (`runner.py`) drives the real services over NATS against a wall-clock fleet, so
routing latency and CPU contention leak into simulated TTFT. This module measures the routing
*policy* alone, exactly and deterministically, by wiring the pure cores together in one loop:

- `Engine` (services/mock_worker/engine.py) per worker, stepped pass by pass on a simulated clock;
- `PrefixIndex` (services/indexer/index.py), fed with the engines' own KV events, each becoming
  visible `event_delay_ms` after the pass that produced it ended (the router's view lags the
  engines, as with a real event bus);
- the scheduler's decision itself, `Decider` (services/scheduler/decide.py), the one the scheduler
  service runs: validation, block hashing, the overlaps of the index's matches, `Selector.select`
  (the cost rule and the A/B policies) over `Candidate`s of discovery records, and the booking
  events; a `LoadTracker` folds those events (`add` on route, `prefill_complete` at the first
  token, `free` at completion).

No NATS, no asyncio, no wall clock: the same inputs and seed give the same report. Time advances
from one event to the next — the earliest of the next trace arrival and the next end of an engine
pass. Ties: pass ends first (so a request finishing at t frees its load before an arrival at t is
routed), then arrivals in trace order.

Decode-pass fusion (`Engine.plan_decode` / `commit_decode`): when an engine's next passes are pure
decode, it commits as many as end no later than the next trace arrival (any arrival may be routed
to it), which equals stepping them one by one (tested in tests/mock_worker). Only the KV events of
the fused span become visible together, at its end.
"""

from __future__ import annotations

import heapq
import math
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from schemas.api import ErrorCode, Policy, SelectRequest
from schemas.discovery import WorkerRecord
from schemas.events import RouterEvent
from schemas.types import MAX_TOKENS
from services.indexer.index import PrefixIndex
from services.mock_worker.engine import Engine, EngineConfig, PassResult
from services.scheduler.admission import AdmissionQueue, Waiting
from services.scheduler.candidates import Candidate, candidates_from
from services.scheduler.cost import CostConfig
from services.scheduler.decide import Decider, PoolView, Prepared
from services.scheduler.load import LoadTracker, Target
from services.scheduler.peers import EngineMetrics, PeerContext, make_peer
from services.scheduler.selector import BusyThresholds, Overlaps, SelectionError, Selector
from services.scheduler.settings import WEIGHT_OVERRIDES, RoutingConfig

from .runner import RequestRecord, RunResult
from .trace import TokenExpander, TraceRequest

ROUTER_ID = "offline"
POOL = "offline"
NO_EXPIRY_MS = 10**15  # bookings end with their request; a TTL sweep would only hide leaks
# The scheduler service's routing defaults (its settings' declarations): the simulator's too.
SERVICE_ROUTING = RoutingConfig()


@dataclass(frozen=True)
class OfflineConfig:
    policy: Policy = Policy.KV
    rate_scale: float = 1.0
    workers: int = 8
    engine: EngineConfig = field(default_factory=EngineConfig)
    event_delay_ms: float = 20.0  # KV event visibility lag behind the engine, simulated ms
    # Lag of `prefill_complete` / `free` behind the engine's first token / completion (the online
    # replay's cleanup round trips, × speed-up): the router's load view is that much stale.
    cleanup_delay_ms: float = 0.0
    # Lag of a decision's own booking `add` behind the decision: selects decided within this
    # window do not see each other (the online scheduler's concurrent selects between scoring and
    # applying the booking from the stream).
    booking_delay_ms: float = 0.0
    seed: int = 0  # RNG of the `random` policy and of softmax sampling (temperature > 0)
    # The cost rule, busy thresholds and admission queue default to the scheduler service's
    # (`SERVICE_ROUTING`; `routing_of` builds them from other settings as the service does).
    cost: CostConfig = field(default_factory=SERVICE_ROUTING.cost)
    max_output_tokens: int | None = None
    fused_decode_steps: int = 256
    salt: int = 0  # hash id → tokens expansion
    # Busy thresholds and the admission queue, as the scheduler service has them (docs/scheduler.md,
    # "Admission queue"): a request that finds every worker busy waits (in simulated time) for a
    # freed slot, in the queue's order, until its deadline. `BusyThresholds()` turns them off.
    busy: BusyThresholds = field(default_factory=SERVICE_ROUTING.busy)
    queue_max_size: int = SERVICE_ROUTING.queue_max_size
    queue_timeout_ms: float = SERVICE_ROUTING.queue_timeout_ms
    # A peer router's policy (`services/scheduler/peers`, by name) choosing instead of `policy`.
    peer: str | None = None
    # How often a gateway scrapes the engines' metrics (the peers' queue and KV-usage scorers read
    # the latest scrape; GAIE's --refresh-metrics-interval).
    metrics_interval_ms: float = 50.0
    label: str = ""  # the run's name in the report (default: the policy, or the peer)

    def __post_init__(self) -> None:
        object.__setattr__(self, "policy", Policy(self.policy))  # a name from the CLI, validated
        if self.rate_scale <= 0 or not math.isfinite(self.rate_scale):
            raise ValueError("rate_scale must be a finite number > 0")
        if self.workers < 1:
            raise ValueError("workers must be >= 1")
        if min(self.event_delay_ms, self.cleanup_delay_ms, self.booking_delay_ms) < 0:
            raise ValueError("event_delay_ms, cleanup_delay_ms and booking_delay_ms must be >= 0")
        if self.fused_decode_steps < 1:
            raise ValueError("fused_decode_steps must be >= 1")
        if self.metrics_interval_ms < 0:
            raise ValueError("metrics_interval_ms must be >= 0")
        if self.queue_max_size < 0 or not (self.queue_timeout_ms >= 0 and math.isfinite(self.queue_timeout_ms)):
            raise ValueError("queue_max_size must be >= 0 and queue_timeout_ms a finite number >= 0")

    @property
    def name(self) -> str:
        return self.label or self.peer or str(self.policy)


# The cost rule's own fields, which are neither scheduler flags nor per-request overrides
# (services/scheduler/cost.py): `--offline-overrides` sets them, to measure a rule's variants.
RULE_FIELDS = ("decode_load_scale", "credit_load_gain", "clip_prefill", "inflight_overlap")
_FLAGS = ("clip_prefill", "inflight_overlap")


def cost_with_overrides(entries: Sequence[str], routing: RoutingConfig = SERVICE_ROUTING) -> CostConfig:
    """The cost rule of the scheduler's routing settings (`RoutingConfig.cost`: `--cost-rule` and
    the weights, exactly as the service builds it), with `--offline-overrides` `key=value` entries
    over it: `rule=kvr|dynamo` (what `--cost-rule` says; the weights are kept) and the rule's own
    fields `decode_load_scale`, `credit_load_gain` (finite, >= 0), `clip_prefill` and
    `inflight_overlap` (0/1), which win over the rule's values whatever their order. The weights
    themselves are the scheduler's flags (`--overlap-score-credit`, ...), not overrides."""
    rule = routing.cost_rule
    values: dict[str, Any] = {}
    for item in entries:
        key, sep, raw = item.partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep:
            raise ValueError(f"bad cost override {item!r} (want key=value)")
        if key == "rule":
            if raw not in ("kvr", "dynamo"):
                raise ValueError(f"bad cost override {item!r}: rule is kvr or dynamo")
            rule = raw
            continue
        weight = next((name for name, wire in WEIGHT_OVERRIDES.items() if key in (name, wire)), None)
        if weight is not None:
            raise ValueError(f"{key} is a scheduler setting: set it with --{weight.replace('_', '-')}, as for `kvr scheduler`")
        if key not in RULE_FIELDS:
            raise ValueError(f"unknown cost override {key!r}; choose from {', '.join((*RULE_FIELDS, 'rule'))}")
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"bad cost override {item!r}: {raw!r} is not a number") from None
        if value < 0 or not math.isfinite(value):
            raise ValueError(f"bad cost override {item!r}: {', '.join(RULE_FIELDS)} are finite and >= 0")
        values[key] = bool(value) if key in _FLAGS else value
    base = routing if rule == routing.cost_rule else routing.with_values(cost_rule=rule)
    cost = base.cost()
    return replace(cost, **values) if values else cost


def routing_of(routing: RoutingConfig, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """`OfflineConfig`'s cost rule, busy thresholds and admission queue from the scheduler's routing
    settings, built by the functions the scheduler service builds its own with, plus `overrides`
    over the cost rule (`cost_with_overrides`)."""
    return {
        "cost": cost_with_overrides(overrides, routing),
        "busy": routing.busy(),
        "queue_max_size": routing.queue_max_size,
        "queue_timeout_ms": routing.queue_timeout_ms,
    }


@dataclass
class _Pending:
    """A request in the fleet: its record and where it went."""

    record: RequestRecord
    worker: int


@dataclass
class OfflineDiagnostics:
    """What the report's summary does not show but explains it."""

    routed_overlap_tokens: int = 0  # Σ overlap the router saw × block size (before the ≥1-token rule)
    passes: int = 0
    fused_commits: int = 0
    events: int = 0
    sim_end_ms: float = 0.0
    max_waiting: dict[int, int] = field(default_factory=dict)
    route_cpu_s: float = 0.0
    engine_cpu_s: float = 0.0


class OfflineSim:
    """One policy at one load over a fresh fleet. `run(requests)` → `RunResult` (same as online)."""

    def __init__(self, cfg: OfflineConfig) -> None:
        self.cfg = cfg
        ec = cfg.engine
        self.block_size = ec.block_size
        self.worker_ids = list(range(1, cfg.workers + 1))
        self.engines = {w: Engine(ec, worker_id=w) for w in self.worker_ids}
        records = [
            WorkerRecord(worker_id=w, pool=POOL, model="mock-model", block_size=ec.block_size, total_kv_blocks=ec.kv_blocks,
                         max_num_batched_tokens=ec.max_num_batched_tokens, max_num_seqs=ec.max_num_seqs)
            for w in self.worker_ids
        ]
        self.candidates: list[Candidate] = candidates_from(records)
        self.index = PrefixIndex()
        self.tracker = LoadTracker(NO_EXPIRY_MS)
        self._scraped: dict[Target, EngineMetrics] = {}
        self._scraped_at = -math.inf
        plugin = None
        if cfg.peer is not None:
            ctx = PeerContext(block_size=ec.block_size, kv_blocks=ec.kv_blocks, metrics=self._metrics, clock=lambda: self._now)
            plugin = make_peer(cfg.peer, ctx)
        self.selector = Selector(busy=cfg.busy, rng=random.Random(cfg.seed), plugin=plugin)
        # The trace's prompts were filtered by length already (`load_trace`): no limit of its own.
        self.decider = Decider(self.selector, cfg.cost, router_id=ROUTER_ID, default_block_size=ec.block_size,
                               max_request_tokens=MAX_TOKENS)
        self.view = PoolView(POOL, self.candidates, self.tracker)
        self.expander = TokenExpander(salt=cfg.salt)
        self.diag = OfflineDiagnostics(max_waiting={w: 0 for w in self.worker_ids})
        # (end_ms, order, worker, result): passes in flight, one per busy engine.
        self._passes: list[tuple[float, int, int, PassResult]] = []
        self._order = 0
        self._busy: set[int] = set()
        self._visible: deque[tuple[float, list[RouterEvent]]] = deque()
        # Booking events not yet in the load view (see booking_delay_ms / cleanup_delay_ms).
        self._updates: list[tuple[float, int, str, Any]] = []
        self._add_due: dict[str, float] = {}
        self._now = 0.0
        self._inflight: dict[str, _Pending] = {}
        self._next_arrival_ms = math.inf
        # The admission queue (the service's pure rule) and what each waiting request needs to go on.
        self.queue = AdmissionQueue(cfg.queue_max_size)
        self._queued: dict[int, tuple[RequestRecord, Prepared, Overlaps, list[int]]] = {}
        self._tickets = 0

    # --- the event loop --------------------------------------------------------------------------

    def run(self, requests: Sequence[TraceRequest], on_progress: Callable[[int, int], None] | None = None) -> RunResult:
        cfg = self.cfg
        t_wall = time.perf_counter()
        ordered = sorted(requests, key=lambda r: (r.timestamp_ms, r.index))
        t0 = ordered[0].timestamp_ms if ordered else 0
        arrivals = [(r.timestamp_ms - t0) / cfg.rate_scale for r in ordered]
        records: list[RequestRecord] = []
        done = 0
        i = 0
        n = len(ordered)
        while i < n or self._passes:
            ta = arrivals[i] if i < n else math.inf
            if self._passes and self._passes[0][0] <= ta:
                end, _, w, res = heapq.heappop(self._passes)
                self._next_arrival_ms = ta
                before = done
                done += self._pass_ended(w, end, res)
                self._admit(end)
                if on_progress and done // 256 != before // 256:
                    on_progress(done, n)
            else:
                self._next_arrival_ms = arrivals[i + 1] if i + 1 < n else math.inf
                records.append(self._route(ordered[i], ta))
                i += 1
        self._apply_visible(math.inf)
        self._now = math.inf
        self._apply_updates(math.inf)
        for left in self.queue.ordered():  # never admitted: overloaded
            self.queue.remove(left.ticket)
            self._queued.pop(left.ticket)[0].error = f"select:{ErrorCode.OVERLOADED}"
        if on_progress:
            on_progress(n, n)
        fleet = self._fleet_stats()
        return RunResult(
            policy=cfg.name,
            rate_scale=cfg.rate_scale,
            speedup=1.0,
            records=records,
            wall_s=time.perf_counter() - t_wall,
            worker_ids=list(self.worker_ids),
            open_bookings=self.tracker.request_ids(),
            fleet=fleet,
        )

    # --- routing (the scheduler's select, minus transport) ---------------------------------------

    def _metrics(self) -> dict[Target, EngineMetrics]:
        """The engines' metrics as a gateway last scraped them (every `metrics_interval_ms`)."""
        if self._now - self._scraped_at >= self.cfg.metrics_interval_ms:
            self._scraped_at = self._now
            self._scraped = {
                (w, 0): EngineMetrics(len(e.waiting), len(e.running), e.pool.active / e.cfg.kv_blocks)
                for w, e in self.engines.items()
            }
        return self._scraped

    def _apply_visible(self, now: float) -> None:
        vis = self._visible
        while vis and vis[0][0] <= now:
            for ev in vis.popleft()[1]:
                self.index.apply(ev)

    def _update_load(self, due: float, kind: str, payload: Any) -> None:
        """A booking event (`add` / `prefill_complete` / `free`) reaching the load view at `due`."""
        # Through the queue even when already due, so it lands after older updates due before it
        # (a request's add before its prefill_complete and free).
        self._order += 1
        heapq.heappush(self._updates, (due, self._order, kind, payload))
        self._apply_updates(self._now)

    def _apply_update(self, due: float, kind: str, payload: Any) -> None:
        if kind == "add":
            self.tracker.add(payload, int(due))
        elif kind == "free":
            self.tracker.free(payload)
        else:
            self.tracker.prefill_complete(payload)

    def _apply_updates(self, now: float) -> None:
        q = self._updates
        while q and q[0][0] <= now:
            due, _, kind, payload = heapq.heappop(q)
            self._apply_update(due, kind, payload)

    def _cleanup(self, end: float, kind: str, rid: str) -> None:
        # Never before the request's own add: the tracker would ignore it and the add would leak.
        due = max(end + self.cfg.cleanup_delay_ms, self._add_due.get(rid, end))
        if kind == "free":
            self._add_due.pop(rid, None)
        self._update_load(due, kind, rid)

    def _route(self, req: TraceRequest, now: float) -> RequestRecord:
        cfg = self.cfg
        t_cpu = time.perf_counter()
        max_tokens = req.output_length or 1
        if cfg.max_output_tokens is not None:
            max_tokens = max(1, min(max_tokens, cfg.max_output_tokens))
        rid = f"{cfg.policy}-{req.index}"
        rec = RequestRecord(
            index=req.index, request_id=rid, arrival_ms=now, prompt_tokens=req.input_length, max_tokens=max_tokens
        )
        self._now = now
        self._apply_visible(now)
        self._apply_updates(now)
        tokens = self.expander.tokens(req)
        select = SelectRequest(request_id=rid, token_ids=tokens, mode="aggregated", policy=cfg.policy,
                               expected_output_tokens=max_tokens)
        self._admit(now)
        try:
            p = self.decider.prepare(select, self.view)
            overlaps = Overlaps.from_scores(self.index.find_matches(p.local)) if p.wants_overlaps else Overlaps()
        except SelectionError as exc:
            rec.error = f"select:{exc.code}"
            return rec
        if len(self.queue):
            self._wait(rec, p, overlaps, tokens, now)  # behind the waiting ones, as in the service
            self._admit(now)
        else:
            self._place(rec, p, overlaps, tokens, now)
        self.diag.route_cpu_s += time.perf_counter() - t_cpu
        return rec

    def _place(self, rec: RequestRecord, p: Prepared, overlaps: Overlaps, tokens: list[int], now: float) -> None:
        """Decide (the scheduler's `Decider`), book and submit to the chosen engine; every eligible
        worker busy → the admission queue."""
        cfg = self.cfg
        rid, max_tokens = rec.request_id, rec.max_tokens
        try:
            out = self.decider.decide(p, overlaps, self.view, policy=cfg.policy, ts_ms=int(now), booking_id="")
        except SelectionError as exc:
            if exc.code == ErrorCode.OVERLOADED and self.queue.capacity > 0:
                self._wait(rec, p, overlaps, tokens, now)
            else:
                rec.error = f"select:{exc.code}"
            return
        decision = out.decision
        assert decision is not None  # request ids are unique: never booked before
        target = decision.decode.candidate
        rec.worker_id = target.worker_id
        rec.overlap_blocks = decision.overlap_blocks
        self.diag.routed_overlap_tokens += decision.overlap_blocks * p.block_size
        add_due = now + cfg.booking_delay_ms
        self._add_due[rid] = add_due
        for ev in out.events:
            self._update_load(add_due, "add", ev)
        engine = self.engines[target.worker_id]
        rejected = engine.submit(rid, tokens, max_tokens, now)
        if rejected is not None:
            rec.error = "generate:invalid_request"
            self._cleanup(now, "free", rid)
            return
        self._inflight[rid] = _Pending(rec, target.worker_id)
        waiting = len(engine.waiting)
        if waiting > self.diag.max_waiting[target.worker_id]:
            self.diag.max_waiting[target.worker_id] = waiting
        if target.worker_id not in self._busy:
            self._start_pass(target.worker_id, now)

    # --- the admission queue (services/scheduler/admission.py) -------------------------------------

    def _wait(self, rec: RequestRecord, p: Prepared, overlaps: Overlaps, tokens: list[int], now: float) -> None:
        self._tickets += 1
        cached = max(overlaps.device.values(), default=0) * p.block_size
        w = Waiting(self._tickets, rec.request_id, int(now), int(now + self.cfg.queue_timeout_ms), p.request.strict_priority,
                    p.request.priority, p.isl, cached)
        offered = self.queue.offer(w)
        if not offered.queued:
            rec.error = f"select:{ErrorCode.OVERLOADED}"
            return
        self._queued[w.ticket] = (rec, p, overlaps, tokens)
        if offered.evicted is not None:
            self._queued.pop(offered.evicted.ticket)[0].error = f"select:{ErrorCode.OVERLOADED}"

    def _admit(self, now: float) -> None:
        """Past their deadline: `overloaded`. Then, in the queue's order, each waiting request
        that has a non-busy eligible worker under the selection's own rule decides and goes."""
        if not len(self.queue):
            return
        self._now = now
        self._apply_visible(now)
        self._apply_updates(now)
        for late in self.queue.expire(int(now)):
            self._queued.pop(late.ticket)[0].error = f"select:{ErrorCode.OVERLOADED}"

        def admissible(w: Waiting) -> bool:
            p = self._queued[w.ticket][1]
            try:
                return self.decider.has_capacity(p, self.view, self.cfg.policy)
            except SelectionError:
                return True  # it decides and records its error

        while (admitted := self.queue.next_admissible(admissible)) is not None:
            rec, p, overlaps, tokens = self._queued.pop(admitted.ticket)
            self._place(rec, p, overlaps, tokens, now)

    # --- engines -----------------------------------------------------------------------------------

    def _start_pass(self, w: int, now: float) -> None:
        t_cpu = time.perf_counter()
        engine = self.engines[w]
        res: PassResult | None = None
        plan = engine.plan_decode(self.cfg.fused_decode_steps)
        if plan is not None:
            horizon = self._next_arrival_ms - now
            steps = 0
            while steps < len(plan) and plan[steps] <= horizon:
                steps += 1
            if steps >= 2:
                res = engine.commit_decode(now, plan, steps)
                if res is not None:
                    self.diag.fused_commits += 1
        if res is None:
            res = engine.step(now)
        self.diag.engine_cpu_s += time.perf_counter() - t_cpu
        if res.events:
            self._visible.append((now + res.duration_ms + self.cfg.event_delay_ms, res.events))
            self.diag.events += len(res.events)
        if res.duration_ms <= 0:
            self._busy.discard(w)  # idle: nothing to compute until the next arrival
            return
        self._busy.add(w)
        self._order += 1
        heapq.heappush(self._passes, (res.end_ms, self._order, w, res))
        self.diag.passes += 1

    def _pass_ended(self, w: int, end: float, res: PassResult) -> int:
        finished = 0
        self._now = end
        for ft in res.first_tokens:
            self._cleanup(end, "prefill_complete", ft.request_id)
        for fin in res.finished:
            pending = self._inflight.pop(fin.request_id)
            rec = pending.record
            rec.ttft_ms = fin.first_token_ms - rec.arrival_ms
            rec.worker_ttft_ms = fin.first_token_ms - fin.arrival_ms
            rec.e2e_ms = fin.at_ms - rec.arrival_ms
            rec.cached_tokens = fin.cached_tokens
            rec.output_tokens = fin.output_tokens
            rec.preemptions = fin.preemptions
            self._cleanup(end, "free", fin.request_id)
            finished += 1
        self.diag.sim_end_ms = max(self.diag.sim_end_ms, end)
        self._start_pass(w, end)
        return finished

    def _fleet_stats(self) -> dict[str, Any]:
        per: dict[str, dict[str, Any]] = {}
        prompt = cached = 0
        for w, e in self.engines.items():
            s = e.stats
            prompt += s.prompt_tokens
            cached += s.cached_tokens
            per[str(w)] = {"busy_ms": round(s.busy_ms, 1), "passes": s.passes, "preemptions": s.preemptions,
                           "evictions": e.pool.evictions, "max_waiting": self.diag.max_waiting[w],
                           "prompt_tokens": s.prompt_tokens, "cached_tokens": s.cached_tokens}
        busy = [p["busy_ms"] for p in per.values()]
        d = self.diag
        return {
            "prompt_tokens": prompt,
            "cached_tokens": cached,
            "lag_max_ms": 0.0,
            "routed_overlap_tokens": d.routed_overlap_tokens,
            "busy_max_over_mean": (max(busy) / (sum(busy) / len(busy))) if busy and sum(busy) else None,
            "passes": d.passes,
            "fused_commits": d.fused_commits,
            "kv_events": d.events,
            "sim_end_ms": round(d.sim_end_ms, 1),
            "route_cpu_s": round(d.route_cpu_s, 2),
            "engine_cpu_s": round(d.engine_cpu_s, 2),
            "index_blocks": self.index.blocks,
            "event_delay_ms": self.cfg.event_delay_ms,
            "cleanup_delay_ms": self.cfg.cleanup_delay_ms,
            "booking_delay_ms": self.cfg.booking_delay_ms,
            "cost": vars(self.cfg.cost) if hasattr(self.cfg.cost, "__dict__") else str(self.cfg.cost),
            "busy": vars(self.cfg.busy),
            "queue_max_size": self.cfg.queue_max_size,
            "queue_timeout_ms": self.cfg.queue_timeout_ms,
            "workers": per,
        }


def run_offline(requests: Sequence[TraceRequest], cfg: OfflineConfig,
                on_progress: Callable[[int, int], None] | None = None) -> RunResult:
    return OfflineSim(cfg).run(requests, on_progress)
