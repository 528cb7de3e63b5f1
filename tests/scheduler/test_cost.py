"""The cost rule (services/scheduler/cost.py): Dynamo's exactly, and each change of ours alone."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.scheduler.cost import DYNAMO_COST, VARIANTS, CostConfig, effective_credit, leg_cost
from services.scheduler.load import LoadTracker, LoadView
from services.scheduler.selector import Overlaps, SelectionInput, Selector

from .helpers import add, cands, record

BS = 16


def test_dynamo_rule_is_dynamo_formula() -> None:
    assert DYNAMO_COST.clip_prefill and DYNAMO_COST.decode_load_scale == 1.0 and DYNAMO_COST.credit_load_gain == 0.0
    assert (DYNAMO_COST.overlap_score_credit, DYNAMO_COST.prefill_load_scale, DYNAMO_COST.temperature) == (1.0, 1.0, 0.0)


@given(
    prefill=st.floats(0, 1e6), credit=st.floats(0, 1e6), decode=st.floats(0, 1e6), scale=st.floats(0, 10),
)
def test_dynamo_cost_equals_the_reference(prefill: float, credit: float, decode: float, scale: float) -> None:
    cfg = replace(DYNAMO_COST, prefill_load_scale=scale)
    assert leg_cost(cfg, prefill, credit, decode) == scale * max(prefill - credit, 0.0) + decode


def test_our_rule_keeps_ordering_past_the_credit_and_weighs_decode_less() -> None:
    ours = CostConfig()
    assert not ours.clip_prefill
    # two cached workers whose credit exceeds their prefill: Dynamo sees 0 for both, we still prefer the larger credit
    assert leg_cost(DYNAMO_COST, 10, 30, 0) == leg_cost(DYNAMO_COST, 10, 20, 0) == 0
    assert leg_cost(ours, 10, 30, 0) < leg_cost(ours, 10, 20, 0)
    assert leg_cost(ours, 0, 0, 1000) == pytest.approx(1000 * ours.decode_load_scale)


def test_adaptive_credit_grows_with_the_fleets_queued_prefill() -> None:
    pool = cands(*(record(w, block_size=BS, max_num_batched_tokens=1000) for w in (1, 2)))
    load = LoadTracker()
    assert effective_credit(CostConfig(), pool, load) == 1.0  # nothing queued: Dynamo's credit
    load.add(add("a", 1, [1], isl=2000, bs=BS), 1_000)  # 2000 prefill tokens queued on worker 1
    assert effective_credit(CostConfig(), pool, load) == pytest.approx(1 + 4.0 * (2000 / 1000) / 2)
    assert effective_credit(DYNAMO_COST, pool, load) == 1.0


def test_a_conversation_stays_on_its_cache_when_another_worker_is_idle_but_busy_with_decodes() -> None:
    """Worker 1 holds 80 of the request's 100 blocks and runs more decodes: Dynamo leaves, we stay."""
    pool = cands(*(record(w, block_size=BS) for w in (1, 2)))

    class Load:
        def view(self, t):
            return {(1, 0): LoadView(0, 900, 5), (2, 0): LoadView(0, 600, 3)}[t]

        def new_blocks(self, t, hashes):
            return 20 if t == (1, 0) else 100

        def leading_active(self, t, hashes):
            return 0

    ov = Overlaps(device={(1, 0): 80})
    hashes = list(range(100))

    def chosen(cost: CostConfig) -> int:
        d = Selector(rng=random.Random(0)).select(pool, Load(), ov, SelectionInput(100 * BS, BS, hashes, cost=cost))
        return d.decode.candidate.worker_id

    # Dynamo: 1 → (100 − 80) + 920 = 940; 2 → 100 + 700 = 800.
    assert chosen(DYNAMO_COST) == 2
    assert chosen(CostConfig()) == 1
    assert chosen(VARIANTS["dynamo+decode"]) == 1


def test_inflight_overlap_counts_a_prefix_booked_but_not_computed_yet() -> None:
    """The next turn of a conversation arrives while the previous one is still queued on worker 1:
    the index has none of its blocks yet, the load tracker has them all (booked there). The
    in-flight blocks are credited by the load-adaptive part of the scale only: with little queued
    in the fleet the turn goes where it starts at once; once the fleet is busy it waits behind
    the prefix it will reuse."""
    pool = cands(*(record(w, block_size=BS) for w in (1, 2)))
    load = LoadTracker()
    load.add(add("turn-1", 1, list(range(50)), bs=BS), 1_000)
    assert load.leading_active((1, 0), list(range(60))) == 50
    assert load.leading_active((1, 0), [999, *range(50)]) == 0 and load.leading_active((2, 0), [0]) == 0
    inp = SelectionInput(60 * BS, BS, list(range(60)))

    def chosen(cost: CostConfig) -> tuple[int, int]:
        d = Selector(rng=random.Random(0)).select(pool, load, Overlaps(), replace(inp, cost=cost))
        return d.decode.candidate.worker_id, d.decode.overlap_blocks

    assert CostConfig().inflight_overlap
    # 800 tokens queued on worker 1 only: credit scale 1.2, 10 of its 50 blocks' worth
    assert chosen(CostConfig()) == (2, 0)
    assert chosen(DYNAMO_COST) == (2, 0)  # Dynamo sees no overlap and 800 queued prefill tokens on worker 1
    # worker 2 gets 720 tokens of its own: scale 1.37, the turn waits behind its prefix on worker 1.
    # The booking's overlap is what the index holds (none yet): its prefill is estimated whole.
    load.add(add("other", 2, list(range(1_000, 1_045)), bs=BS), 1_000)
    assert chosen(CostConfig()) == (1, 0)
    assert chosen(replace(CostConfig(), inflight_overlap=False)) == (2, 0)


def test_identical_prompts_arriving_together_spread_once_the_queue_outweighs_the_credit() -> None:
    """A burst of the same long prompt: each booking adds the whole prompt to its target's queue
    (none of it is cached yet), so the in-flight credit draws only a few onto the first target and
    the rest spread; booked at the in-flight overlap (~0 tokens each) they would all pile up."""
    pool = cands(*(record(w, block_size=BS) for w in (1, 2, 3, 4)))
    load = LoadTracker()
    hashes = list(range(64))
    picks = []
    for i in range(16):
        inp = SelectionInput(64 * BS, BS, hashes, cost=CostConfig())
        d = Selector(rng=random.Random(0)).select(pool, load, Overlaps(), inp)
        picks.append(d.decode.candidate.worker_id)
        # booked as the scheduler books it: at the decision's overlap
        load.add(add(f"burst-{i}", d.decode.candidate.worker_id, hashes, overlap=d.decode.overlap_blocks, bs=BS), 1_000)
    per_worker = {w: picks.count(w) for w in (1, 2, 3, 4)}
    assert max(per_worker.values()) - min(per_worker.values()) <= 2, per_worker


def test_variants_are_dynamo_with_changes() -> None:
    for name, cfg in VARIANTS.items():
        assert cfg != DYNAMO_COST, name
        assert cfg.temperature == 0.0 and cfg.prefill_load_scale == 1.0


def test_the_scheduler_service_takes_its_rule_from_settings() -> None:
    """`--cost-rule` picks the rule; the cost flags apply over it (no NATS needed to build the app)."""
    from services.scheduler.app import SchedulerApp

    from .conftest import scheduler_cfg

    assert SchedulerApp(scheduler_cfg("nats://127.0.0.1:1")).cost == CostConfig()
    dyn = SchedulerApp(scheduler_cfg("nats://127.0.0.1:1", "--cost-rule", "dynamo", "--overlap-score-credit", "2"))
    assert dyn.cost == replace(DYNAMO_COST, overlap_score_credit=2.0)
