"""Decision tables for the selector (pure): cost rule, ties, overrides, filters, modes, softmax, policies."""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.api import Overrides
from services.scheduler.cost import DYNAMO_COST, CostConfig
from services.scheduler.load import EMPTY, LoadView
from services.scheduler.selector import (
    BusyThresholds,
    Overlaps,
    ReportedLoad,
    SelectionError,
    SelectionInput,
    Selector,
    softmax_pick,
    taint_multiplier,
)

from .helpers import cands, record


def dynamo(**kw) -> CostConfig:
    """Dynamo's exact rule (these tables are Dynamo's worked examples), with changes."""
    return replace(DYNAMO_COST, **kw)

REQ = list(range(1, 11))  # the request's 10 sequence hashes (160 tokens at block size 16)


class FakeLoad:
    def __init__(self, views=None, active=None):
        self.views = views or {}
        self.active = active or {}

    def view(self, t):
        return self.views.get(t, EMPTY)

    def new_blocks(self, t, hashes):
        return len(set(hashes) - self.active.get(t, set()))

    def leading_active(self, t, hashes):
        n = 0
        for h in hashes:
            if h not in self.active.get(t, set()):
                break
            n += 1
        return n


def inp(**kw) -> SelectionInput:
    kw.setdefault("isl_tokens", 160)
    kw.setdefault("block_size", 16)
    kw.setdefault("hashes", REQ)
    kw.setdefault("cost", DYNAMO_COST)
    return SelectionInput(**kw)


def pick(cs, load=None, ov=None, selector=None, **kw):
    d = (selector or Selector()).select(cs, load or FakeLoad(), ov or Overlaps(), inp(**kw))
    return d


def worked_example():
    """The worked example of Dynamo's cost rule: A (id 1) overlap 8, 64 prefill tokens, 30 active blocks (8 of ours);
    B (id 2) no overlap, 20 unrelated active blocks."""
    load = FakeLoad(
        views={(1, 0): LoadView(64, 30, 3), (2, 0): LoadView(0, 20, 2)},
        active={(1, 0): set(range(1, 9)) | set(range(100, 122)), (2, 0): set(range(200, 220))},
    )
    ov = Overlaps(device={(1, 0): 8}, tree_sizes={(1, 0): 500, (2, 0): 100})
    return cands(record(1), record(2)), load, ov


def test_worked_example_costs_and_winner():
    cs, load, ov = worked_example()
    d = pick(cs, load, ov)
    assert d.decode.candidate.worker_id == 1 and d.prefill is None and d.mode == "aggregated"
    assert d.cost == pytest.approx(38.0) and d.overlap_blocks == 8
    s = Selector()
    costs = {c.worker_id: s.score(c, load, ov, inp(), "aggregated").cost for c in cs}
    assert costs == {1: pytest.approx(38.0), 2: pytest.approx(40.0)}


def test_tie_goes_to_smaller_tree_then_lower_id():
    cs, load, ov = worked_example()
    # prefill_load_scale 0.5 (classic overlap weight 0.5): A = 3 + 32 = 35, B = 5 + 30 = 35.
    d = pick(cs, load, ov, cost=dynamo(prefill_load_scale=0.5))
    assert d.cost == pytest.approx(35.0) and d.decode.candidate.worker_id == 2  # B's tree is smaller
    ov.tree_sizes = {(1, 0): 10, (2, 0): 100}
    assert pick(cs, load, ov, cost=dynamo(prefill_load_scale=0.5)).decode.candidate.worker_id == 1
    ov.tree_sizes = {}
    assert pick(cs, load, ov, cost=dynamo(prefill_load_scale=0.5)).decode.candidate.worker_id == 1  # lower id


def test_idle_fleet_picks_lowest_worker_id_and_lowest_rank():
    cs = cands(record(5, dp_size=2), record(3, dp_start_rank=2, dp_size=2))
    d = pick(cs)
    assert (d.decode.candidate.worker_id, d.decode.candidate.dp_rank) == (3, 2)


def test_dp_ranks_are_separate_candidates_with_their_endpoints():
    cs = cands(record(1, dp_size=2, dp_ports=[9000, 9001]))
    load = FakeLoad(views={(1, 0): LoadView(0, 50, 1)}, active={(1, 0): set(range(500, 550))})
    d = pick(cs, load)
    assert (d.decode.candidate.dp_rank, d.decode.candidate.endpoint) == (1, "10.0.0.1:9001")


def test_overrides_credit_zero_ignores_cache():
    cs, load, ov = worked_example()
    base = dynamo()
    no_credit = base.with_overrides(Overrides(overlap_score_credit=0.0))
    d = pick(cs, load, ov, cost=no_credit)
    # A = 14 + 32 = 46, B = 10 + 30 = 40.
    assert d.decode.candidate.worker_id == 2 and d.cost == pytest.approx(40.0)
    assert base.with_overrides(None) is base
    assert base.with_overrides(Overrides(temperature=0.5)).temperature == 0.5


def test_host_and_disk_tiers_give_partial_credit_beyond_device():
    cs = cands(record(1), record(2))
    # Worker 1: 4 device + (8−4) host blocks → credit 4 + 0.75·4 = 7; worker 2: 10 disk → 2.5.
    ov = Overlaps(device={(1, 0): 4}, host={(1, 0): 8}, disk={(2, 0): 10})
    s = Selector()
    c1 = s.score(cs[0], FakeLoad(), ov, inp(), "aggregated").cost
    c2 = s.score(cs[1], FakeLoad(), ov, inp(), "aggregated").cost
    assert c1 == pytest.approx((10 - 7) + 10) and c2 == pytest.approx((10 - 2.5) + 10)


def test_required_and_preferred_taints():
    cs = cands(record(1, taints=["zone=a"]), record(2, taints=["zone=b", "gpu=h100"]), record(3, taints=["zone=b"]))
    assert pick(cs, required_taints=frozenset({"zone=b"})).decode.candidate.worker_id == 2
    assert pick(cs, required_taints=frozenset({"zone=b", "gpu=h100"})).decode.candidate.worker_id == 2
    with pytest.raises(SelectionError) as err:
        pick(cs, required_taints=frozenset({"zone=c"}))
    assert err.value.code == "constraints_unsatisfied" and "required taint" in err.value.message
    # Equal costs: a positive preference makes worker 3 cheaper; a negative one pushes worker 1 away.
    d = pick(cs, preferred_taints={"zone=b": 0.5, "gpu=h100": -2.0})
    assert d.decode.candidate.worker_id == 3
    assert d.cost == pytest.approx(20.0 * math.exp(-math.tanh(0.5)))
    assert taint_multiplier(frozenset({"x"}), {}) == 1.0
    assert taint_multiplier(frozenset({"x"}), {"x": 100.0}) == pytest.approx(math.exp(-1))
    assert taint_multiplier(frozenset({"x"}), {"x": 0.3}) * taint_multiplier(frozenset({"x"}), {"x": -0.3}) == pytest.approx(1)


def test_pinned_worker_and_rank():
    cs, load, ov = worked_example()
    d = pick(cs, load, ov, pinned_worker_id=2)
    assert d.decode.candidate.worker_id == 2 and d.cost == pytest.approx(40.0)
    with pytest.raises(SelectionError) as err:
        pick(cs, load, ov, pinned_worker_id=99)
    assert err.value.code == "not_found"
    with pytest.raises(SelectionError) as err:
        pick(cs, load, ov, pinned_worker_id=2, pinned_dp_rank=3)
    assert err.value.code == "not_found" and "dp rank 3" in err.value.message
    # Pinned beats the allowed list order of checks: pinned outside allowed ids is a constraint failure.
    with pytest.raises(SelectionError) as err:
        pick(cs, load, ov, pinned_worker_id=2, allowed_worker_ids=frozenset({1}))
    assert err.value.code == "constraints_unsatisfied"


def test_allowed_worker_ids():
    cs, load, ov = worked_example()
    assert pick(cs, load, ov, allowed_worker_ids=frozenset({2, 77})).decode.candidate.worker_id == 2
    with pytest.raises(SelectionError) as err:
        pick(cs, load, ov, allowed_worker_ids=frozenset({77}))
    assert err.value.code == "constraints_unsatisfied" and "allowed_worker_ids" in err.value.message


def test_allowed_targets_restrict_to_ranks_and_fallbacks_rank_the_rest_by_cost():
    cs, load, ov = worked_example()
    best = pick(cs, load, ov, fallbacks=5)
    order = [best.decode.candidate.target] + [f.candidate.target for f in best.fallbacks]
    assert len(order) == len(set(order)) == len(cs)  # every other target once, chosen first
    costs = [best.decode.cost] + [f.cost for f in best.fallbacks]
    assert costs == sorted(costs)
    assert pick(cs, load, ov).fallbacks == () and len(pick(cs, load, ov, fallbacks=1).fallbacks) == 1
    last = order[-1]
    d = pick(cs, load, ov, allowed_targets=frozenset({last, (77, 0)}), fallbacks=2)
    assert d.decode.candidate.target == last and d.fallbacks == ()
    with pytest.raises(SelectionError) as err:
        pick(cs, load, ov, allowed_targets=frozenset({(77, 0)}))
    assert err.value.code == "no_workers"


def test_no_workers_and_role_errors():
    with pytest.raises(SelectionError) as err:
        pick([])
    assert err.value.code == "no_workers"
    with pytest.raises(SelectionError) as err:
        pick(cands(record(1)), mode="disaggregated")
    assert err.value.code == "no_workers" and "prefill" in err.value.message
    with pytest.raises(SelectionError) as err:
        pick(cands(record(1, role="prefill")), mode="aggregated")
    assert err.value.code == "no_workers"


def test_busy_thresholds_filter_and_overload():
    cs = cands(record(1, total_kv_blocks=100, max_num_batched_tokens=1000), record(2, total_kv_blocks=100, max_num_batched_tokens=1000))
    load = FakeLoad(views={(1, 0): LoadView(900, 95, 5), (2, 0): LoadView(100, 10, 1)})
    for busy in (BusyThresholds(active_decode_blocks=0.9), BusyThresholds(active_prefill_tokens=500),
                 BusyThresholds(active_prefill_tokens_frac=0.5)):
        # Worker 1 would win on cost (lower id, we make 2 dearer) but it is busy.
        heavy = FakeLoad(views=load.views, active={(2, 0): set()})
        assert pick(cs, heavy, selector=Selector(busy)).decode.candidate.worker_id == 2
    everyone = FakeLoad(views={(1, 0): LoadView(900, 95, 5), (2, 0): LoadView(900, 95, 5)})
    with pytest.raises(SelectionError) as err:
        pick(cs, everyone, selector=Selector(BusyThresholds(active_decode_blocks=0.9)))
    assert err.value.code == "overloaded"
    # Off by default: the loaded worker stays eligible.
    assert pick(cs, everyone).decode.candidate.worker_id == 1


def test_disaggregated_pair():
    cs = cands(record(1, role="prefill"), record(2, role="prefill"), record(3, role="decode"), record(4, role="decode"))
    load = FakeLoad(views={(3, 0): LoadView(0, 40, 2), (4, 0): LoadView(0, 5, 1)})
    # Prefill: worker 2 holds 6 blocks. Decode: credit 0, so the cache on 3 is irrelevant; 4 is lighter.
    ov = Overlaps(device={(2, 0): 6, (3, 0): 10})
    d = pick(cs, load, ov, mode="disaggregated")
    assert d.mode == "disaggregated"
    assert d.prefill is not None and d.prefill.candidate.worker_id == 2 and d.prefill.cost == pytest.approx(4 + 10)
    assert d.decode.candidate.worker_id == 4 and d.decode.cost == pytest.approx(15)
    assert d.overlap_blocks == 6 and d.cost == pytest.approx(14)
    # auto = disaggregated because live prefill workers exist
    assert pick(cs, load, ov).mode == "disaggregated"
    # auto without prefill workers = aggregated over the decode workers
    d = pick(cs[2:], load, ov)
    # full cost now: 3 = max(10 − 10, 0) + 40 + 10 = 50; 4 = 10 + 5 + 10 = 25
    assert d.mode == "aggregated" and d.prefill is None and d.decode.candidate.worker_id == 4
    assert d.cost == pytest.approx(25.0)


def test_disaggregated_filters_apply_to_both_legs():
    cs = cands(record(1, role="prefill", taints=["z=a"]), record(2, role="prefill"), record(3, role="decode", taints=["z=a"]),
               record(4, role="decode"))
    d = pick(cs, mode="disaggregated", required_taints=frozenset({"z=a"}))
    assert (d.prefill.candidate.worker_id, d.decode.candidate.worker_id) == (1, 3)
    d = pick(cs, mode="disaggregated", pinned_worker_id=4)
    assert (d.prefill.candidate.worker_id, d.decode.candidate.worker_id) == (1, 4)


def test_softmax_statistics_match_the_formula():
    costs = [10.0, 12.0, 20.0]
    t = 0.5
    expected = [math.exp(-(c - 10) / (10 * t)) for c in costs]
    total = sum(expected)
    expected = [e / total for e in expected]
    rng = random.Random(7)
    n = 20_000
    counts = Counter(softmax_pick(costs, t, rng) for _ in range(n))
    for i, p in enumerate(expected):
        assert abs(counts[i] / n - p) < 0.015, (i, counts[i] / n, p)
    # Same seed → same draws; equal costs → uniform; large T → near uniform; one candidate → it.
    assert [softmax_pick(costs, t, random.Random(3)) for _ in range(5)] == [softmax_pick(costs, t, random.Random(3)) for _ in range(5)]
    flat = Counter(softmax_pick([5.0] * 4, t, rng) for _ in range(8000))
    assert all(abs(flat[i] / 8000 - 0.25) < 0.03 for i in range(4))
    hot = Counter(softmax_pick(costs, 1000.0, rng) for _ in range(9000))
    assert all(abs(hot[i] / 9000 - 1 / 3) < 0.03 for i in range(3))
    assert softmax_pick([3.0], t, rng) == 0


def test_temperature_sampling_in_select_is_seeded():
    cs, load, ov = worked_example()
    s1, s2 = Selector(rng=random.Random(11)), Selector(rng=random.Random(11))
    seq1 = [pick(cs, load, ov, selector=s1, cost=dynamo(temperature=1.0)).decode.candidate.worker_id for _ in range(50)]
    seq2 = [pick(cs, load, ov, selector=s2, cost=dynamo(temperature=1.0)).decode.candidate.worker_id for _ in range(50)]
    assert seq1 == seq2 and set(seq1) == {1, 2}


def test_policies_share_filters_and_scoring():
    cs = cands(record(1, taints=["t"]), record(2), record(3, taints=["t"]), record(4, taints=["t"]))
    s = Selector(rng=random.Random(1))
    rr = [pick(cs, selector=s, policy="round_robin", required_taints=frozenset({"t"})).decode.candidate.worker_id for _ in range(6)]
    assert rr == [1, 3, 4, 1, 3, 4]
    rnd = {pick(cs, selector=s, policy="random").decode.candidate.worker_id for _ in range(60)}
    assert rnd == {1, 2, 3, 4}
    load = FakeLoad(views={(1, 0): LoadView(0, 9, 1), (2, 0): LoadView(32, 3, 1), (3, 0): LoadView(0, 4, 1), (4, 0): LoadView(0, 7, 1)})
    d = pick(cs, load, selector=s, policy="least_loaded")
    assert d.decode.candidate.worker_id == 3 and d.policy == "least_loaded"  # 2 has 3 + 32/16 = 5 > 4
    assert d.cost == pytest.approx(10 + 4 + 10)  # the kv cost of the chosen target is still reported
    with pytest.raises(SelectionError):
        pick(cs, selector=s, policy="round_robin", required_taints=frozenset({"nope"}))


def test_every_policy_has_a_chooser_and_an_unknown_one_is_refused():
    from schemas.api import POLICY_NAMES, ErrorCode, Policy
    from services.scheduler.selector import _CHOOSERS

    assert set(_CHOOSERS) == set(Policy) and POLICY_NAMES == ("kv", "round_robin", "random", "least_loaded")
    cs = cands(record(1), record(2))
    for policy in Policy:
        assert pick(cs, policy=policy).policy is policy
    with pytest.raises(SelectionError) as err:
        pick(cs, policy="fastest")
    assert err.value.code is ErrorCode.INVALID_REQUEST


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 40), st.integers(0, 200), st.integers(0, 10), st.integers(0, 50)), min_size=1, max_size=6),
    st.integers(16, 400),
)
def test_temperature_zero_picks_a_minimum_cost_target_deterministically(workers, isl):
    cs = cands(*(record(i + 1) for i in range(len(workers))))
    load = FakeLoad(views={(i + 1, 0): LoadView(p, b, 1) for i, (b, p, _, _) in enumerate(workers)})
    ov = Overlaps(device={(i + 1, 0): o for i, (_, _, o, _) in enumerate(workers)},
                  tree_sizes={(i + 1, 0): t for i, (_, _, _, t) in enumerate(workers)})
    d1 = pick(cs, load, ov, isl_tokens=isl)
    d2 = pick(list(reversed(cs)), load, ov, isl_tokens=isl)  # candidate order does not matter
    assert d1.decode.candidate == d2.decode.candidate
    s = Selector()
    costs = [s.score(c, load, ov, inp(isl_tokens=isl), "aggregated").cost for c in cs]
    assert d1.cost == pytest.approx(min(costs))


def test_busy_from_worker_load_reports():
    cs = cands(record(1), record(2, total_kv_blocks=100))
    sel = Selector(BusyThresholds(active_decode_blocks=0.5, active_prefill_tokens=1000))
    # Worker 1's record has no capacity: the report's kv_total_blocks is used for the fraction.
    reported = {(1, 0): ReportedLoad(decode_blocks=90, prefill_tokens=0, total_blocks=100)}
    assert pick(cs, selector=sel, reported=reported).decode.candidate.worker_id == 2
    reported[(2, 0)] = ReportedLoad(decode_blocks=0, prefill_tokens=5000, total_blocks=None)
    with pytest.raises(SelectionError) as err:
        pick(cs, selector=sel, reported=reported)
    assert err.value.code == "overloaded"
    # Without thresholds, reports change nothing.
    assert pick(cs, reported=reported).decode.candidate.worker_id == 1


# --- issue 18: per-request disaggregated fallback (Dynamo's disagg profile handler) ------------


def _pd_pool():
    return cands(record(1, role="prefill", total_kv_blocks=100), record(2, role="prefill", total_kv_blocks=100),
                 record(3, role="decode", taints=["z=a"], total_kv_blocks=100), record(4, role="aggregated", taints=["z=a"],
                 total_kv_blocks=100))


def test_auto_falls_back_to_aggregated_when_the_gateway_offers_no_prefill_worker():
    """Dynamo's `disagg-profile-handler`: if the prefill profile finds no pods, the request is routed
    aggregated on the decode pods. Before, the query failed `no_workers`."""
    cs = _pd_pool()
    d = pick(cs, allowed_targets=frozenset({(3, 0), (4, 0)}))
    assert d.mode == "aggregated" and d.prefill is None and d.fell_back and d.decode.candidate.worker_id in (3, 4)
    d = pick(cs, allowed_worker_ids=frozenset({3}))
    assert d.mode == "aggregated" and d.decode.candidate.worker_id == 3
    # The prefill leg still exists when offered: disaggregated as before.
    d = pick(cs, allowed_targets=frozenset({(1, 0), (3, 0)}))
    assert d.mode == "disaggregated" and d.prefill.candidate.worker_id == 1 and not d.fell_back
    # An explicit mode is obeyed: no fallback.
    with pytest.raises(SelectionError) as err:
        pick(cs, mode="disaggregated", allowed_targets=frozenset({(3, 0)}))
    assert err.value.code == "no_workers"


def test_auto_falls_back_when_a_required_taint_or_busy_thresholds_exclude_every_prefill_worker():
    cs = _pd_pool()
    d = pick(cs, required_taints=frozenset({"z=a"}))
    assert d.mode == "aggregated" and d.decode.candidate.worker_id in (3, 4)
    busy = Selector(BusyThresholds(active_decode_blocks=0.9))
    full = FakeLoad(views={(1, 0): LoadView(0, 95, 1), (2, 0): LoadView(0, 95, 1)})
    d = pick(cs, full, selector=busy)
    assert d.mode == "aggregated" and d.decode.candidate.worker_id in (3, 4)
    # Everyone busy: `overloaded` (the admission queue's cue), not no_workers.
    everyone = FakeLoad(views={t: LoadView(0, 95, 1) for t in ((1, 0), (2, 0), (3, 0), (4, 0))})
    with pytest.raises(SelectionError) as err:
        pick(cs, everyone, selector=busy)
    assert err.value.code == "overloaded"
    assert not busy.has_capacity(cs, everyone, inp())
    assert busy.has_capacity(cs, full, inp())


def test_pool_of_prefill_and_aggregated_workers_routes_auto_queries():
    """A pool of prefill + aggregated workers (no decode workers): auto-mode queries used to fail
    "no eligible decode workers" every time; they route aggregated."""
    cs = cands(record(1, role="prefill"), record(2, role="aggregated"))
    d = pick(cs)
    assert d.mode == "aggregated" and d.decode.candidate.worker_id == 2


def test_a_taint_failure_on_the_prefill_leg_is_constraints_unsatisfied():
    """Dynamo's `RoutingConstraintsUnsatisfied`: the prefill worker lacks the taint while a decode
    worker has it. Before, the role filter after the taint filter answered `no_workers`."""
    cs = cands(record(1, role="prefill"), record(3, role="decode", taints=["z=a"]))
    with pytest.raises(SelectionError) as err:
        pick(cs, mode="disaggregated", required_taints=frozenset({"z=a"}))
    assert err.value.code == "constraints_unsatisfied" and "prefill" in err.value.message
    # auto: the decode worker carries it, so the request falls back to aggregated on it.
    assert pick(cs, required_taints=frozenset({"z=a"})).decode.candidate.worker_id == 3
    # Nobody carries it: constraints_unsatisfied from both attempts.
    with pytest.raises(SelectionError) as err:
        pick(cs, required_taints=frozenset({"z=b"}))
    assert err.value.code == "constraints_unsatisfied"


def test_pinned_prefill_worker_and_rank():
    """Dynamo's `prefill_worker_id` / `prefill_dp_rank`: the prefill leg is pinned (and validated),
    which makes an auto request disaggregated."""
    cs = cands(record(1, role="prefill", dp_size=2), record(2, role="prefill"), record(3, role="decode"))
    d = pick(cs, pinned_prefill_worker_id=1, pinned_prefill_dp_rank=1)
    assert d.mode == "disaggregated" and d.prefill.candidate.target == (1, 1)
    for kw, code in (({"pinned_prefill_worker_id": 99}, "not_found"),
                     ({"pinned_prefill_worker_id": 1, "pinned_prefill_dp_rank": 5}, "not_found"),
                     ({"pinned_prefill_worker_id": 3}, "not_found")):
        with pytest.raises(SelectionError) as err:
            pick(cs, **kw)
        assert err.value.code == code, kw
