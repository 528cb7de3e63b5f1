"""The decision (pure): validate → hash → overlaps → selection input → choose → booking events."""

from __future__ import annotations

import random

import pytest

from schemas.api import ErrorCode, Policy, SelectRequest
from schemas.hashing import local_block_hashes, salt_seed, sequence_hashes
from services.scheduler.cost import CostConfig
from services.scheduler.decide import Decider, PoolView
from services.scheduler.load import PREFILL_LEG, LoadTracker
from services.scheduler.selector import Overlaps, SelectionError, Selector
from services.scheduler.state import BookingState

from .helpers import add, cands, record

pytestmark = pytest.mark.unit

TOKENS = list(range(100, 164))  # 4 blocks of 16


def decider(limit: int = 1_000) -> Decider:
    return Decider(Selector(rng=random.Random(0)), CostConfig(), router_id="me", default_block_size=16, max_request_tokens=limit)


def view(tracker: LoadTracker | None = None, *records) -> PoolView:
    return PoolView("p", cands(*(records or (record(1), record(2)))), tracker or LoadTracker())


def test_prompts_over_the_limit_are_refused_with_the_field() -> None:
    d, v = decider(limit=64), view()
    for req, path in [
        (SelectRequest(request_id="a", token_ids=list(range(65))), "$.token_ids"),
        (SelectRequest(request_id="a", block_hashes=[1, 2, 3, 4, 5]), "$.block_hashes"),
        (SelectRequest(request_id="a", token_ids=[1], isl_tokens=65), "$.isl_tokens"),
    ]:
        with pytest.raises(SelectionError) as err:
            d.prepare(req, v)
        assert err.value.code is ErrorCode.INVALID_REQUEST and err.value.path == path


def test_prepare_hashes_with_the_pools_block_size_and_salt() -> None:
    v = view(None, record(1, block_size=32))
    p = decider().prepare(SelectRequest(request_id="a", token_ids=TOKENS, lora_name="l"), v)
    local = local_block_hashes(TOKENS, 32, salt_seed("l", None))
    assert (p.block_size, p.local, p.seq, p.isl) == (32, local, sequence_hashes(local), 64)
    hashed = decider().prepare(SelectRequest(request_id="b", block_hashes=[7, 8], isl_tokens=20), v)
    assert (hashed.local, hashed.isl) == ([7, 8], 20)
    assert decider().prepare(SelectRequest(request_id="c", block_hashes=[7, 8]), view()).isl == 32  # no isl: blocks × size


def test_decide_picks_by_the_overlaps_and_books_one_add_per_leg() -> None:
    d, v = decider(), view()
    p = d.prepare(SelectRequest(request_id="r", token_ids=TOKENS, expected_output_tokens=9), v)
    out = d.decide(p, Overlaps(device={(2, 0): 3}), v, policy=Policy.KV, ts_ms=5_000, booking_id="b1")
    assert out.decision is not None and out.reply.decode.worker_id == 2 and out.reply.overlap_blocks == 3
    (ev,) = out.events
    assert (ev.worker_id, ev.overlap_blocks, ev.booking_id, ev.ts_ms, ev.router_id, ev.pool) == (2, 3, "b1", 5_000, "me", "p")
    assert (ev.sequence_hashes, ev.isl_tokens, ev.leg, ev.track_prefill_tokens) == (p.seq, 64, "", True)
    assert ev.expected_output_tokens == 9
    assert out.reply.booking_id == "b1" and out.reply.request_id == "r"
    unbooked = d.decide(d.prepare(SelectRequest(request_id="q", token_ids=TOKENS, book=False), v), Overlaps(), v,
                        policy=Policy.KV, ts_ms=5_000, booking_id="")
    assert unbooked.events == () and unbooked.reply.booking_id == ""


def test_disaggregated_books_a_prefill_leg_that_alone_tracks_prefill_tokens() -> None:
    d = decider()
    v = view(None, record(1, role="prefill"), record(2, role="decode"))
    p = d.prepare(SelectRequest(request_id="r", token_ids=TOKENS), v)
    out = d.decide(p, Overlaps(), v, policy=Policy.KV, ts_ms=1, booking_id="b")
    assert [(e.worker_id, e.leg, e.track_prefill_tokens) for e in out.events] == [(1, PREFILL_LEG, True), (2, "", False)]
    assert out.reply.mode == "disaggregated" and out.reply.prefill is not None and out.reply.prefill.worker_id == 1


def test_a_booked_request_is_answered_with_its_booking_before_and_after_the_index() -> None:
    d, state = decider(), BookingState()
    state.apply(add("r", 2, [1], bid="old"), 1_000)
    v = view(state.tracker)
    p = d.prepare(SelectRequest(request_id="r", token_ids=TOKENS), v)
    assert p.booked is not None and p.booked.booking_id == "old" and p.booked.policy == "booked" and p.local == []
    assert d.decide(p, Overlaps(), v, policy=Policy.KV, ts_ms=1, booking_id="new").events == ()
    fresh = d.prepare(SelectRequest(request_id="s", token_ids=TOKENS), v)
    state.apply(add("s", 1, [1], bid="theirs"), 1_000)  # booked meanwhile by a concurrent select
    out = d.decide(fresh, Overlaps(), v, policy=Policy.KV, ts_ms=1, booking_id="mine")
    assert out.decision is None and out.events == () and out.reply.booking_id == "theirs"


def test_settle_answers_with_what_the_stream_booked() -> None:
    d, state = decider(), BookingState()
    v = view(state.tracker)
    p = d.prepare(SelectRequest(request_id="r", token_ids=TOKENS), v)
    out = d.decide(p, Overlaps(device={(2, 0): 4}), v, policy=Policy.KV, ts_ms=1_000, booking_id="b")
    assert d.settle(out, v).booking_id == ""  # nothing booked (a free cancelled it)
    state.apply(out.events[0], 1_000)
    assert d.settle(out, v) == out.reply
    state.apply(add("r", 1, [1], bid="b"), 1_000)  # same attempt, other target: another replica's copy won
    other = BookingState()
    other.apply(add("r", 1, [1], bid="b"), 1_000)
    settled = d.settle(out, view(other.tracker))
    assert settled.decode.worker_id == 1 and settled.booking_id == "b" and settled.policy == "booked"


def test_the_offline_simulator_decides_with_the_same_decider() -> None:
    from services.replay.offline import OfflineConfig, OfflineSim

    sim = OfflineSim(OfflineConfig(workers=2))
    assert type(sim.decider) is Decider and sim.decider.selector is sim.selector


def test_booking_a_pick_made_elsewhere_books_exactly_those_legs_with_their_own_overlap() -> None:
    """The split API (epp.book) is a select with both legs pinned: like Dynamo's `add_request`, it
    books the chosen (worker, rank) with the overlap computed for that worker, and a chosen target
    that is unknown, dead, of the wrong rank or role books nothing (a structured error)."""
    d = decider()
    v = view(None, record(1, role="prefill"), record(2, role="decode", dp_size=2), record(3, role="decode"))
    ov = Overlaps(device={(1, 0): 2, (3, 0): 4})
    req = SelectRequest(request_id="r", token_ids=TOKENS, mode="disaggregated", pinned_worker_id=2, pinned_dp_rank=1,
                        pinned_prefill_worker_id=1, pinned_prefill_dp_rank=0)
    out = d.decide(d.prepare(req, v), ov, v, policy=Policy.KV, ts_ms=1, booking_id="b")
    assert [(e.worker_id, e.dp_rank, e.leg, e.overlap_blocks) for e in out.events] == [(1, 0, PREFILL_LEG, 2), (2, 1, "", 0)]
    for bad, code in (({"pinned_worker_id": 9}, ErrorCode.NOT_FOUND), ({"pinned_dp_rank": 7}, ErrorCode.NOT_FOUND),
                      ({"pinned_prefill_worker_id": 3}, ErrorCode.NOT_FOUND)):
        wrong = SelectRequest(**{**{f: getattr(req, f) for f in req.__struct_fields__}, **bad})
        with pytest.raises(SelectionError) as err:
            d.decide(d.prepare(wrong, v), ov, v, policy=Policy.KV, ts_ms=1, booking_id="b")
        assert err.value.code is code, bad
