"""The scheduler's decision, pure: the one implementation, called by the scheduler service
(`SchedulerApp`, also in the EPP bridge's one-process mode) and by the offline simulator
(`services/replay/offline.py`), so a decision changed here is measured by the simulator as is.

    validate → hash → [overlaps] → selection input → choose → booking events

It is cut in two at the one step that may need I/O. `Decider.prepare` validates the request and
hashes its prompt (or finds that the request is booked already). The caller then gets the overlaps
of `Prepared.local`: the embedded index, the predicted cache and the offline index answer
synchronously; a remote indexer is awaited. `Decider.decide` does the rest and returns the decision,
the booking events to publish and the reply. Publishing the events and waiting for the bookings
stream stay in the adapter; once they are applied, `Decider.settle` says what to answer (another
replica may have booked the same attempt first, or a free may have cancelled it meanwhile).

No clock, no I/O: the booking's timestamp and id are passed in; randomness comes from the
`Selector`'s seeded RNG.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import msgspec

from schemas.api import ErrorCode, Policy, SelectReply, SelectRequest, mm_objects
from schemas.api import Target as WireTarget
from schemas.bookings import BookingAdd
from schemas.hashing import effective_salt, local_block_hashes, salt_seed, sequence_hashes

from .candidates import Candidate
from .cost import CostConfig
from .load import PREFILL_LEG, LoadTracker, Target
from .selector import Decision, Overlaps, ReportedLoad, SelectionError, SelectionInput, Selector

NO_REPORTS: Mapping[Target, ReportedLoad] = {}


class PoolView(NamedTuple):
    """What a decision reads about one pool at one instant."""

    pool: str
    candidates: Sequence[Candidate]  # live (worker, dp_rank) targets, in (worker, rank) order
    load: LoadTracker
    reported: Mapping[Target, ReportedLoad] = NO_REPORTS  # fresh worker load reports (busy detection)


@dataclass(frozen=True, slots=True)
class Prepared:
    """A validated request and its hashes; `booked` when it is booked already (nothing to decide)."""

    request: SelectRequest
    block_size: int
    local: list[int]  # local block hashes: what the index matches
    seq: list[int]  # sequence hashes: the blocks a booking adds to the load
    isl: int
    booked: SelectReply | None = None

    @property
    def wants_overlaps(self) -> bool:
        """Whether to ask the index (a prompt of at least one block, and candidates to score)."""
        return bool(self.local)


@dataclass(frozen=True, slots=True)
class Outcome:
    reply: SelectReply
    decision: Decision | None = None  # None: answered with the request's existing booking
    events: tuple[BookingAdd, ...] = ()  # to publish (and apply) before answering; () without `book`


def wire_target(c: Candidate) -> WireTarget:
    return WireTarget(worker_id=c.worker_id, dp_rank=c.dp_rank, pod_name=c.pod_name, endpoint=c.endpoint)


class Decider:
    """The decision with the scheduler's fixed parameters (cost defaults, limits, router id)."""

    def __init__(
        self,
        selector: Selector,
        cost: CostConfig,
        *,
        router_id: str,
        default_block_size: int = 16,
        max_request_tokens: int = 131_072,
    ) -> None:
        self.selector = selector
        self.cost = cost
        self.router_id = router_id
        self.default_block_size = default_block_size
        self.max_request_tokens = max_request_tokens

    def block_size(self, view: PoolView) -> int:
        """The pool's block size: its live workers' (they share one), else the configured default."""
        return view.candidates[0].block_size if view.candidates else self.default_block_size

    # --- validate → hash -------------------------------------------------------------------------

    def prepare(self, req: SelectRequest, view: PoolView) -> Prepared:
        """Refuse prompts over the size limit (`invalid_request`, nothing changes), answer a retried
        select of a booked request with its booking, else hash the prompt."""
        block_size = self.block_size(view)
        limit = self.max_request_tokens
        if req.token_ids is not None and len(req.token_ids) > limit:
            raise SelectionError(
                ErrorCode.INVALID_REQUEST, f"{len(req.token_ids)} tokens exceed the limit of {limit}", "$.token_ids"
            )
        if req.block_hashes is not None and len(req.block_hashes) * block_size > limit:
            raise SelectionError(
                ErrorCode.INVALID_REQUEST, f"{len(req.block_hashes)} blocks exceed the limit of {limit} tokens", "$.block_hashes"
            )
        if req.isl_tokens is not None and req.isl_tokens > limit:
            raise SelectionError(
                ErrorCode.INVALID_REQUEST, f"isl_tokens {req.isl_tokens} exceeds the limit of {limit}", "$.isl_tokens"
            )
        if req.book and view.load.is_active(req.request_id):
            booked = self.booked_reply(req.request_id, view, block_size)
            if booked is not None:
                return Prepared(req, block_size, [], [], booked.isl_tokens, booked)
        if req.token_ids is not None:
            seed = salt_seed(req.lora_name, effective_salt(req.cache_salt, req.cache_namespace))
            local = local_block_hashes(req.token_ids, block_size, seed, mm_objects(req.multimodal))
            isl = req.isl_tokens if req.isl_tokens is not None else len(req.token_ids)
        else:
            local = list(req.block_hashes or [])
            isl = req.isl_tokens if req.isl_tokens is not None else len(local) * block_size
        return Prepared(req, block_size, local, sequence_hashes(local), isl)

    # --- selection input → choose → booking events ---------------------------------------------

    def selection_input(self, p: Prepared, view: PoolView, policy: Policy) -> SelectionInput:
        """What the selector needs of a prepared request (its filters, pins, mode and cost)."""
        req = p.request
        constraints = req.routing_constraints
        return SelectionInput(
            isl_tokens=p.isl,
            block_size=p.block_size,
            hashes=p.seq,
            allowed_worker_ids=frozenset(req.allowed_worker_ids) if req.allowed_worker_ids is not None else None,
            allowed_targets=frozenset((w, r) for w, r in req.allowed_targets) if req.allowed_targets is not None else None,
            fallbacks=req.fallbacks,
            pinned_worker_id=req.pinned_worker_id,
            pinned_dp_rank=req.pinned_dp_rank,
            pinned_prefill_worker_id=req.pinned_prefill_worker_id,
            pinned_prefill_dp_rank=req.pinned_prefill_dp_rank,
            required_taints=frozenset(constraints.required_taints) if constraints else frozenset(),
            preferred_taints=dict(constraints.preferred_taints) if constraints else {},
            mode=req.mode,
            policy=policy,
            cost=self.cost.with_overrides(req.overrides),
            reported=view.reported,
        )

    def has_capacity(self, p: Prepared, view: PoolView, policy: Policy) -> bool:
        """Whether `p` has an eligible target that is not busy now: the admission queue's test, by
        the selection's own eligibility rule (`Selector.has_capacity`). Raises the other errors."""
        return self.selector.has_capacity(view.candidates, view.load, self.selection_input(p, view, policy))

    def decide(self, p: Prepared, overlaps: Overlaps, view: PoolView, *, policy: Policy, ts_ms: int, booking_id: str) -> Outcome:
        """Choose the target(s) of `p` given the overlaps (empty when the index could not answer:
        then load alone decides), and with `book` the adds to publish under `booking_id`.
        Raises `SelectionError` when no target is eligible."""
        if p.booked is not None:
            return Outcome(p.booked)
        req = p.request
        inp = self.selection_input(p, view, policy)
        decision = self.selector.select(view.candidates, view.load, overlaps, inp)
        if req.book and view.load.is_active(req.request_id):
            # Booked meanwhile: a concurrent select of the same request id on this replica (the
            # adapter awaited the index between `prepare` and here).
            booked = self.booked_reply(req.request_id, view, p.block_size)
            if booked is not None:
                return Outcome(booked)
        events = self.booking_events(p, decision, view.pool, ts_ms, booking_id) if req.book else ()
        reply = SelectReply(
            decode=wire_target(decision.decode.candidate),
            prefill=wire_target(decision.prefill.candidate) if decision.prefill else None,
            overlap_blocks=decision.overlap_blocks,
            isl_tokens=p.isl,
            block_size=p.block_size,
            cost=decision.cost,
            mode=decision.mode,  # type: ignore[arg-type]  # "aggregated" | "disaggregated" once decided
            policy=decision.policy,
            fallbacks=[wire_target(f.candidate) for f in decision.fallbacks],
            request_id=req.request_id,
            booking_id=booking_id if req.book else "",
        )
        return Outcome(reply, decision, events)

    def booking_events(self, p: Prepared, d: Decision, pool: str, ts_ms: int, booking_id: str) -> tuple[BookingAdd, ...]:
        """One add per leg: the decode (or aggregated) target, plus a prefill leg in disaggregated
        mode (which alone tracks the prompt's prefill tokens)."""
        req = p.request
        events: list[BookingAdd] = []
        legs = [(d.prefill, PREFILL_LEG, True)] if d.prefill is not None else []
        legs.append((d.decode, "", d.prefill is None))
        for scored, leg, track in legs:
            c = scored.candidate
            events.append(
                BookingAdd(
                    request_id=req.request_id, router_id=self.router_id, pool=pool, ts_ms=ts_ms, booking_id=booking_id,
                    worker_id=c.worker_id, dp_rank=c.dp_rank, isl_tokens=p.isl, overlap_blocks=scored.overlap_blocks,
                    sequence_hashes=p.seq, expected_output_tokens=req.expected_output_tokens, leg=leg, block_size=p.block_size,
                    track_prefill_tokens=track,
                )
            )
        return tuple(events)

    # --- after the stream ------------------------------------------------------------------------

    def settle(self, outcome: Outcome, view: PoolView) -> SelectReply:
        """The answer once the outcome's adds were published and applied. Another replica may have
        booked the same attempt first (JetStream dropped our add as a duplicate), or a free may have
        cancelled it before it landed: answer with what is booked (`booking_id` "" if nothing)."""
        reply = outcome.reply
        if not outcome.events or outcome.decision is None:
            return reply
        booked = self.booked_reply(reply.request_id, view, reply.block_size)
        if booked is None or booked.booking_id != reply.booking_id:
            return msgspec.structs.replace(reply, booking_id="")
        if (booked.decode.worker_id, booked.decode.dp_rank) != outcome.decision.decode.candidate.target:
            return booked
        return reply

    def booked_reply(self, request_id: str, view: PoolView, block_size: int) -> SelectReply | None:
        """A retried select of a request that is already booked answers with the booked targets
        (of its oldest booking, if concurrent selects on several replicas booked it more than once)."""
        booked = view.load.legs_of(request_id)
        if not booked:
            return None
        booking_id = booked[0].booking_id
        legs = {leg.leg: leg for leg in booked if leg.booking_id == booking_id}
        decode = legs.get("")
        if decode is None:
            return None
        by_target = {c.target: c for c in view.candidates}

        def wire(target: Target) -> WireTarget:
            c = by_target.get(target)
            return wire_target(c) if c else WireTarget(worker_id=target[0], dp_rank=target[1])

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
            request_id=request_id,
            booking_id=booking_id,
        )

