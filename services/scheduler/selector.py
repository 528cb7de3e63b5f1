"""Worker selection: eligibility filters, the cost rule of docs/protocol.md §7, and A/B policies.

Pure: inputs are the candidates, a load view, the indexer's overlaps and the request; randomness
comes from the `random.Random` handed in, so a seeded selector is reproducible.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from operator import attrgetter
from typing import NamedTuple, Protocol

from schemas.api import ErrorCode, MatchReply, Policy, WorkerScore

from .candidates import Candidate
from .cost import CostConfig, effective_credit, leg_cost
from .load import LoadView, Target

TIE_EPS = 1e-9


class SelectionError(Exception):
    """No decision: a request the decision refuses (`invalid_request`, with the field's `path`) or
    one no target is eligible for; `code` is a docs/protocol.md §5 error code."""

    def __init__(self, code: ErrorCode, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.path = path


class LoadSource(Protocol):
    def view(self, target: Target) -> LoadView: ...

    def new_blocks(self, target: Target, hashes: Iterable[int]) -> int: ...

    def leading_active(self, target: Target, hashes: Sequence[int]) -> int: ...


class ReportedLoad(NamedTuple):
    """A worker's own load report (`LoadReport` on `kvr.{pool}.load.{worker_id}`)."""

    decode_blocks: int
    prefill_tokens: int
    total_blocks: int | None


@dataclass(frozen=True)
class BusyThresholds:
    """As Dynamo's busy detection; None = off. A (worker, dp_rank) over any enabled threshold is not eligible."""

    active_decode_blocks: float | None = None  # fraction of total_kv_blocks
    active_prefill_tokens: float | None = None  # absolute tokens
    active_prefill_tokens_frac: float | None = None  # fraction of max_num_batched_tokens

    @property
    def enabled(self) -> bool:
        return not (self.active_decode_blocks is None and self.active_prefill_tokens is None
                    and self.active_prefill_tokens_frac is None)

    def busy(self, c: Candidate, load: LoadView, reported: ReportedLoad | None = None) -> bool:
        """Over a threshold by the router's own bookings, or by the worker's latest report."""
        if reported is not None:
            own_total = c.total_kv_blocks
            if reported.total_blocks and not own_total:
                c = replace(c, total_kv_blocks=reported.total_blocks)
            if self.busy(c, LoadView(reported.prefill_tokens, reported.decode_blocks, 0)):
                return True
        if (
            self.active_decode_blocks is not None
            and c.total_kv_blocks
            and load.active_blocks / c.total_kv_blocks > self.active_decode_blocks
        ):
            return True
        if self.active_prefill_tokens is not None and load.active_prefill_tokens > self.active_prefill_tokens:
            return True
        return bool(
            self.active_prefill_tokens_frac is not None
            and c.max_num_batched_tokens
            and load.active_prefill_tokens > self.active_prefill_tokens_frac * c.max_num_batched_tokens
        )


@dataclass
class Overlaps:
    """Leading cached blocks per target and tier, plus tree sizes (tie-break)."""

    device: dict[Target, int] = field(default_factory=dict)
    host: dict[Target, int] = field(default_factory=dict)
    disk: dict[Target, int] = field(default_factory=dict)
    tree_sizes: dict[Target, int] = field(default_factory=dict)

    @classmethod
    def from_match(cls, reply: MatchReply) -> Overlaps:
        def table(scores: Iterable[WorkerScore]) -> dict[Target, int]:
            return {(s.worker_id, s.dp_rank): s.blocks for s in scores}

        tiers = reply.tier_scores or {}
        return cls(
            device=table(reply.scores),
            host=table(tiers.get("host_pinned", ())),
            disk=table(tiers.get("disk", ())),
            tree_sizes=table(reply.tree_sizes),
        )

    @classmethod
    def from_scores(cls, res: OverlapScoresLike) -> Overlaps:
        """From the index's own result (one-process mode): the same tables, already keyed by target."""
        tiers = res.tier_scores
        return cls(device=res.scores, host=tiers.get("host_pinned", {}), disk=tiers.get("disk", {}), tree_sizes=res.tree_sizes)


@dataclass(frozen=True)
class SelectionInput:
    isl_tokens: int
    block_size: int
    hashes: Sequence[int]  # the request's sequence hashes (its blocks)
    allowed_worker_ids: frozenset[int] | None = None
    # (worker_id, dp_rank) targets the request may use (the gateway's endpoint subset); None = any.
    allowed_targets: frozenset[Target] | None = None
    pinned_worker_id: int | None = None  # the decode (or aggregated) leg's
    pinned_dp_rank: int | None = None
    pinned_prefill_worker_id: int | None = None
    pinned_prefill_dp_rank: int | None = None
    required_taints: frozenset[str] = frozenset()
    preferred_taints: Mapping[str, float] = field(default_factory=dict)
    mode: str = "auto"
    policy: Policy = Policy.KV
    cost: CostConfig = CostConfig()
    # Fresh worker load reports by target (busy detection only; the cost uses the bookings).
    reported: Mapping[Target, ReportedLoad] = field(default_factory=dict)
    # How many next-best decode targets to name besides the choice (gateway fallbacks).
    fallbacks: int = 0
    # The request's blocks as a set (each candidate's new decode blocks), made once per request.
    hash_set: frozenset[int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "hash_set", frozenset(self.hashes))


class OverlapScoresLike(Protocol):
    """`services.indexer.index.OverlapScores`, without importing the indexer into the scheduler core."""

    scores: dict[Target, int]
    tier_scores: dict[str, dict[Target, int]]
    tree_sizes: dict[Target, int]


class Scored(NamedTuple):
    candidate: Candidate
    cost: float
    overlap_blocks: int
    prefill_blocks: float
    decode_blocks: int


@dataclass(frozen=True)
class Decision:
    decode: Scored
    prefill: Scored | None
    mode: str
    policy: Policy
    # Next-best decode targets, lowest cost first (`SelectionInput.fallbacks` of them at most).
    fallbacks: tuple[Scored, ...] = ()
    # `auto` in a pool with prefill workers, routed aggregated because no prefill (or decode) leg was eligible.
    fell_back: bool = False

    @property
    def overlap_blocks(self) -> int:
        return (self.prefill or self.decode).overlap_blocks

    @property
    def cost(self) -> float:
        return (self.prefill or self.decode).cost


def taint_multiplier(taints: frozenset[str], preferred: Mapping[str, float]) -> float:
    """exp(−tanh(Σ weights of matched preferred taints)); 1 when the request prefers nothing."""
    if not preferred:
        return 1.0
    return math.exp(-math.tanh(sum(w for t, w in preferred.items() if t in taints)))


def softmax_pick(costs: Sequence[float], temperature: float, rng: random.Random) -> int:
    """Dynamo's softmax: p_i ∝ exp(−(c_i − c_min) / ((c_max − c_min) · T))."""
    if len(costs) == 1:
        return 0
    lo, hi = min(costs), max(costs)
    if hi - lo <= TIE_EPS * max(1.0, abs(hi)):
        return rng.randrange(len(costs))
    span = (hi - lo) * temperature
    weights = [math.exp(-(c - lo) / span) for c in costs]
    total = sum(weights)
    u = rng.random() * total
    acc = 0.0
    for i, w in enumerate(weights):
        acc += w
        if acc >= u:
            return i
    return len(costs) - 1


_cost = attrgetter("cost")

AGGREGATED_ROLES = ("aggregated", "decode")
# Which of two eligibility errors to report when both `auto` attempts fail: the higher.
_ERROR_RANK: dict[str, int] = {
    ErrorCode.OVERLOADED: 3, ErrorCode.NOT_FOUND: 2, ErrorCode.CONSTRAINTS_UNSATISFIED: 1, ErrorCode.NO_WORKERS: 0,
}


class Legs(NamedTuple):
    """A request's mode and each leg's eligible targets (`prefill` None when aggregated)."""

    mode: str
    prefill: list[Candidate] | None
    decode: list[Candidate]
    fell_back: bool = False


def _leg_name(leg: str) -> str:
    return "prefill " if leg == "prefill" else ""


class ChoicePlugin(Protocol):
    """A routing policy that is not one of ours (a peer router's, `services/scheduler/peers/`),
    plugged into the selector: it picks among the eligible targets, after the same filters, and the
    pick is scored and booked like any other (one decision path). It may keep state of its own
    (approximate prefix trees of routed prompts); `choose` is called once per leg decided."""

    name: str

    def choose(
        self, pool: Sequence[Candidate], load: LoadSource, ov: Overlaps, inp: SelectionInput, rng: random.Random
    ) -> Candidate: ...


class Selector:
    def __init__(
        self, busy: BusyThresholds | None = None, rng: random.Random | None = None, plugin: ChoicePlugin | None = None
    ) -> None:
        self.busy = busy or BusyThresholds()
        self._busy_enabled = self.busy.enabled
        self.rng = rng or random.Random()
        self._rr: dict[str, int] = {}
        # When set, the plugin chooses instead of the request's policy (the offline simulator's peers).
        self.plugin = plugin

    # --- eligibility ---------------------------------------------------------------------------

    def eligible(
        self, cands: Sequence[Candidate], load: LoadSource, inp: SelectionInput, roles: tuple[str, ...], leg: str
    ) -> list[Candidate]:
        """The targets one leg may use, filters in the order of docs/scheduler.md ("Eligibility"),
        each with its own error. The role comes before the taints, so a taint no worker *of the
        leg's role* carries is `constraints_unsatisfied`, not `no_workers`."""
        if not cands:
            raise SelectionError(ErrorCode.NO_WORKERS, "no live workers in the pool")
        pool = list(cands)
        pin, pin_rank = (
            (inp.pinned_prefill_worker_id, inp.pinned_prefill_dp_rank) if leg == "prefill" else (inp.pinned_worker_id, inp.pinned_dp_rank)
        )
        if pin is not None:
            pool = [c for c in pool if c.worker_id == pin]
            if not pool:
                raise SelectionError(ErrorCode.NOT_FOUND, f"pinned {_leg_name(leg)}worker {pin} is not a live worker")
            if pin_rank is not None:
                pool = [c for c in pool if c.dp_rank == pin_rank]
                if not pool:
                    raise SelectionError(ErrorCode.NOT_FOUND, f"pinned {_leg_name(leg)}worker {pin} does not serve dp rank {pin_rank}")
        if inp.allowed_worker_ids is not None:
            pool = [c for c in pool if c.worker_id in inp.allowed_worker_ids]
            if not pool:
                raise SelectionError(ErrorCode.CONSTRAINTS_UNSATISFIED, "no live worker is in allowed_worker_ids")
        if inp.allowed_targets is not None:
            pool = [c for c in pool if c.target in inp.allowed_targets]
            if not pool:
                raise SelectionError(ErrorCode.NO_WORKERS, "no live worker rank is in allowed_targets")
        pool = [c for c in pool if c.role in roles]
        if not pool:
            if pin is not None:
                raise SelectionError(ErrorCode.NOT_FOUND, f"pinned worker {pin} is not a live {'/'.join(roles)} worker")
            raise SelectionError(ErrorCode.NO_WORKERS, f"no eligible {'/'.join(roles)} workers for the {leg} target")
        if inp.required_taints:
            pool = [c for c in pool if inp.required_taints <= c.taints]
            if not pool:
                need = sorted(inp.required_taints)
                raise SelectionError(
                    ErrorCode.CONSTRAINTS_UNSATISFIED, f"no eligible {'/'.join(roles)} worker carries every required taint {need}"
                )
        if not self._busy_enabled:
            return pool
        reported = inp.reported
        not_busy = [c for c in pool if not self.busy.busy(c, load.view(c.target), reported.get(c.target))]
        if not not_busy:
            raise SelectionError(ErrorCode.OVERLOADED, f"all {len(pool)} eligible {'/'.join(roles)} workers are over the busy thresholds")
        return not_busy

    def legs(self, cands: Sequence[Candidate], load: LoadSource, inp: SelectionInput) -> Legs:
        """The mode and the eligible targets of each leg.

        `auto` is decided per request, as Dynamo's disaggregated profile handler does: when the pool
        has live prefill workers the request goes disaggregated if both legs have an eligible
        target, and otherwise falls back to aggregated over the aggregated and decode workers —
        whether the gateway's pods, the label filter, a required taint or the busy thresholds
        excluded every prefill worker, or the pool has prefill but no decode workers. A pinned
        prefill worker is explicit: no fallback. When both attempts fail, the more useful error
        wins (`_ERROR_RANK`: `overloaded` first, since waiting can help)."""
        mode = inp.mode
        if mode == "auto":
            has_prefill = any(c.role == "prefill" for c in cands)
            if not has_prefill:
                mode = "aggregated"
            elif inp.pinned_prefill_worker_id is not None:
                mode = "disaggregated"
            elif inp.pinned_worker_id is not None:
                pinned_role = next((c.role for c in cands if c.worker_id == inp.pinned_worker_id), None)
                if pinned_role not in (None, "decode"):
                    mode = "aggregated"
        if mode == "aggregated":
            return Legs(mode, None, self.eligible(cands, load, inp, AGGREGATED_ROLES, "aggregated"))
        if mode == "disaggregated":
            return self._disaggregated(cands, load, inp)
        try:
            return self._disaggregated(cands, load, inp)
        except SelectionError as disagg:
            try:
                return Legs("aggregated", None, self.eligible(cands, load, inp, AGGREGATED_ROLES, "aggregated"), fell_back=True)
            except SelectionError as agg:
                raise agg if _ERROR_RANK.get(agg.code, 0) > _ERROR_RANK.get(disagg.code, 0) else disagg from None

    def _disaggregated(self, cands: Sequence[Candidate], load: LoadSource, inp: SelectionInput) -> Legs:
        prefill = self.eligible(cands, load, inp, ("prefill",), "prefill")
        return Legs("disaggregated", prefill, self.eligible(cands, load, inp, ("decode",), "decode"))

    def has_capacity(self, cands: Sequence[Candidate], load: LoadSource, inp: SelectionInput) -> bool:
        """Whether the request has an eligible target that is not busy (the admission queue's test:
        the same rule as selection). Raises the other eligibility errors."""
        try:
            self.legs(cands, load, inp)
        except SelectionError as exc:
            if exc.code == ErrorCode.OVERLOADED:
                return False
            raise
        return True

    # --- scoring -------------------------------------------------------------------------------

    def score(
        self, c: Candidate, load: LoadSource, ov: Overlaps, inp: SelectionInput, leg: str, credit_scale: float = 1.0
    ) -> Scored:
        """The cost of `c` for one leg (services/scheduler/cost.py); `credit_scale` multiplies the
        overlap credit (the load-adaptive credit of our rule, computed once per decision)."""
        t = c.target
        view = load.view(t)
        device = ov.device.get(t, 0)  # cached now: what the booking's prefill estimate assumes
        decode_blocks = view.active_blocks + load.new_blocks(t, inp.hash_set)
        if leg == "decode":
            # Disaggregated decode leg (Dynamo's decode router): credit 0, no prefill tracking.
            prefill_blocks = 0.0
            cost = float(decode_blocks)
        else:
            cfg = inp.cost
            prefill_blocks = (view.active_prefill_tokens + inp.isl_tokens) / inp.block_size
            credit = cfg.overlap_score_credit * device
            held = device
            if ov.host or ov.disk:  # lower tiers only count where some worker reported them
                host = ov.host.get(t, 0)
                disk = ov.disk.get(t, 0)
                host_extra = max(host - device, 0)
                disk_extra = max(disk - max(device, host), 0)
                credit += cfg.host_cache_hit_weight * host_extra + cfg.disk_cache_hit_weight * disk_extra
                held = max(device, host, disk)
            credit *= credit_scale
            if cfg.inflight_overlap and credit_scale > 1.0:
                # Leading blocks that requests booked on the target will have computed before this
                # one is prefilled, credited by the load-adaptive part of the scale only (services/
                # scheduler/cost.py). The booking keeps `device`: its prefill estimate is whole.
                inflight = load.leading_active(t, inp.hashes) - held
                if inflight > 0:
                    credit += cfg.overlap_score_credit * inflight * (credit_scale - 1.0)
            cost = leg_cost(cfg, prefill_blocks, credit, decode_blocks)
        if inp.preferred_taints:
            cost *= taint_multiplier(c.taints, inp.preferred_taints)
        return Scored(c, cost, device, prefill_blocks, decode_blocks)

    def choose(self, pool: list[Candidate], load: LoadSource, ov: Overlaps, inp: SelectionInput, leg: str) -> Scored:
        """The target of one leg among the eligible `pool`, by the request's policy (`_CHOOSERS`), or
        by the selector's plug-in when it has one."""
        if self.plugin is not None:
            return self.score(self.plugin.choose(pool, load, ov, inp, self.rng), load, ov, inp, leg)
        chooser = _CHOOSERS.get(inp.policy)
        if chooser is None:
            raise SelectionError(ErrorCode.INVALID_REQUEST, f"unknown policy {inp.policy!r}")
        return chooser(self, pool, load, ov, inp, leg)

    def by_cost(self, pool: list[Candidate], load: LoadSource, ov: Overlaps, inp: SelectionInput, leg: str) -> Scored:
        """`kv`: the lowest cost (docs/protocol.md §7); ties to the smaller tree, then the lower target;
        softmax sampling at temperature > 0."""
        score = self.score
        scale = effective_credit(inp.cost, pool, load) if leg != "decode" else 1.0
        scored = [score(c, load, ov, inp, leg, scale) for c in pool]
        if inp.cost.temperature > 0:
            return scored[softmax_pick([s.cost for s in scored], inp.cost.temperature, self.rng)]
        best = min(scored, key=_cost).cost
        tol = TIE_EPS * max(1.0, abs(best))
        ties = [s for s in scored if s.cost - best <= tol]
        if len(ties) == 1:
            return ties[0]
        return min(ties, key=lambda s: (ov.tree_sizes.get(s.candidate.target, 0), s.candidate.target))

    def round_robin(self, pool: list[Candidate], load: LoadSource, ov: Overlaps, inp: SelectionInput, leg: str) -> Scored:
        """`round_robin`: one counter per leg, over the eligible targets in (worker, rank) order."""
        i = self._rr.get(leg, 0)
        self._rr[leg] = i + 1
        return self.score(pool[i % len(pool)], load, ov, inp, leg)

    def at_random(self, pool: list[Candidate], load: LoadSource, ov: Overlaps, inp: SelectionInput, leg: str) -> Scored:
        """`random`: uniform over the eligible targets (the seeded RNG)."""
        return self.score(pool[self.rng.randrange(len(pool))], load, ov, inp, leg)

    def least_loaded(self, pool: list[Candidate], load: LoadSource, ov: Overlaps, inp: SelectionInput, leg: str) -> Scored:
        """`least_loaded`: the lowest active blocks + active prefill tokens / block size, then the lower target."""

        def current(c: Candidate) -> tuple[float, tuple[int, int]]:
            v = load.view(c.target)
            return (v.active_blocks + v.active_prefill_tokens / inp.block_size, c.target)

        return self.score(min(pool, key=current), load, ov, inp, leg)

    def select(self, cands: Sequence[Candidate], load: LoadSource, ov: Overlaps, inp: SelectionInput) -> Decision:
        legs = self.legs(cands, load, inp)
        if legs.prefill is None:
            chosen = self.choose(legs.decode, load, ov, inp, "aggregated")
            alternates = self.alternates(legs.decode, chosen, load, ov, inp, "aggregated")
            return Decision(chosen, None, legs.mode, inp.policy, alternates, fell_back=legs.fell_back)
        prefill = self.choose(legs.prefill, load, ov, inp, "prefill")
        decode = self.choose(legs.decode, load, ov, inp, "decode")
        return Decision(decode, prefill, legs.mode, inp.policy, self.alternates(legs.decode, decode, load, ov, inp, "decode"))

    def alternates(
        self, pool: list[Candidate], chosen: Scored, load: LoadSource, ov: Overlaps, inp: SelectionInput, leg: str
    ) -> tuple[Scored, ...]:
        """The next-best targets by the cost rule (whatever the policy), for the gateway to retry on."""
        if inp.fallbacks <= 0 or len(pool) < 2:
            return ()
        others = [self.score(c, load, ov, inp, leg) for c in pool if c.target != chosen.candidate.target]
        others.sort(key=lambda s: (s.cost, s.candidate.target))
        return tuple(others[: inp.fallbacks])


Chooser = Callable[[Selector, list[Candidate], LoadSource, Overlaps, SelectionInput, str], Scored]

# The policies: one chooser each (`Policy` is the one list of their names).
_CHOOSERS: dict[Policy, Chooser] = {
    Policy.KV: Selector.by_cost,
    Policy.ROUND_ROBIN: Selector.round_robin,
    Policy.RANDOM: Selector.at_random,
    Policy.LEAST_LOADED: Selector.least_loaded,
}
assert set(_CHOOSERS) == set(Policy), "every policy needs a chooser"
