"""The admission queue's rule (pure): Dynamo's WSPT order with strict-priority tiers, bounds,
eviction, deadlines and the admissibility walk; property tests against a brute-force model."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.scheduler.admission import AdmissionQueue, Waiting, wspt

pytestmark = pytest.mark.unit


def w(ticket: int, *, tier: int = 0, prio: int = 0, isl: int = 100, cached: int = 0, deadline: int = 10_000) -> Waiting:
    return Waiting(ticket, f"r-{ticket}", 0, deadline, tier, prio, isl, cached)


def test_wspt_key_matches_dynamos_unit_example():
    """Dynamo's queue policy test: ISL 1024 with 60 cached blocks of 16 → 1/64; negative priority
    jumps count as 0; a fully cached prompt divides by 1."""
    assert wspt(0, 1024, 60 * 16) == pytest.approx(1 / 64)
    assert wspt(-5, 1024, 60 * 16) == pytest.approx(1 / 64)
    assert wspt(3, 1024, 60 * 16) == pytest.approx(4 / 64)
    assert wspt(0, 100, 500) == 1.0


def test_order_is_strict_tier_then_wspt_then_arrival():
    """Dynamo's scheduling queue: strict_priority tiers always first; inside a tier the shortest
    expected (uncached) prefill first; equal keys in arrival order."""
    q = AdmissionQueue(10)
    for item in (w(1, isl=1000), w(2, isl=100), w(3, isl=1000, cached=950), w(4, tier=1, isl=5000), w(5, isl=100), w(6, prio=9, isl=1000)):
        assert q.offer(item).queued
    assert [x.ticket for x in q.ordered()] == [4, 3, 2, 5, 6, 1]


def test_full_queue_evicts_the_last_only_for_a_better_newcomer():
    q = AdmissionQueue(2)
    assert q.offer(w(1, isl=100)).queued and q.offer(w(2, isl=1000)).queued
    refused = q.offer(w(3, isl=5000))
    assert not refused.queued and refused.evicted is None and len(q) == 2
    took = q.offer(w(4, isl=10))
    assert took.queued and took.evicted is not None and took.evicted.ticket == 2
    assert [x.ticket for x in q.ordered()] == [4, 1]
    assert not AdmissionQueue(0).offer(w(1)).queued  # capacity 0: the queue is off


def test_deadlines_and_the_admissibility_walk():
    q = AdmissionQueue(8)
    for item in (w(1, isl=10, deadline=50), w(2, isl=20, deadline=500), w(3, isl=30, deadline=500)):
        q.offer(item)
    assert [x.ticket for x in q.expire(100)] == [1] and 1 not in q
    # Request 2's own targets are busy; 3's are not: 3 goes (no head-of-line blocking across constraints).
    assert q.next_admissible(lambda x: x.ticket == 3).ticket == 3
    assert q.next_admissible(lambda x: False) is None and [x.ticket for x in q.ordered()] == [2]
    assert q.remove(2) and not q.remove(2) and len(q) == 0


ops = st.lists(
    st.one_of(
        st.tuples(st.just("offer"), st.integers(0, 2), st.integers(-3, 3), st.integers(1, 3000), st.integers(0, 3000),
                  st.integers(0, 1000)),
        st.tuples(st.just("expire"), st.integers(0, 1000)),
        st.tuples(st.just("admit"), st.sets(st.integers(0, 60), max_size=10)),
        st.tuples(st.just("remove"), st.integers(0, 60)),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 6), ops)
def test_queue_matches_a_brute_force_model(capacity, script):
    """Against a model that sorts a plain list on every step: same members, same order, the bound
    holds, an eviction only ever displaces a lower-ranked request, admission takes the first
    admissible in order, expiry takes exactly the past-deadline ones."""
    q = AdmissionQueue(capacity)
    model: list[Waiting] = []

    def key(x: Waiting) -> tuple[int, float, int]:
        return (-x.strict_priority, -wspt(x.priority, x.isl_tokens, x.cached_tokens), x.ticket)

    ticket = 0
    for op in script:
        if op[0] == "offer":
            _, tier, prio, isl, cached, deadline = op
            ticket += 1
            item = w(ticket, tier=tier, prio=prio, isl=isl, cached=cached, deadline=deadline)
            out = q.offer(item)
            model.sort(key=key)
            if len(model) < capacity:
                assert out.queued and out.evicted is None
                model.append(item)
            elif capacity and key(item) < key(model[-1]):
                assert out.queued and out.evicted == model[-1]
                model[-1] = item
            else:
                assert not out.queued and out.evicted is None
        elif op[0] == "expire":
            gone = q.expire(op[1])
            assert {x.ticket for x in gone} == {x.ticket for x in model if x.deadline_ms <= op[1]}
            model = [x for x in model if x.deadline_ms > op[1]]
        elif op[0] == "admit":
            allowed = op[1]
            got = q.next_admissible(lambda x, allowed=allowed: x.ticket in allowed)
            model.sort(key=key)
            first = next((x for x in model if x.ticket in allowed), None)
            assert got == first
            if first is not None:
                model.remove(first)
        else:
            present = any(x.ticket == op[1] for x in model)
            assert q.remove(op[1]) == present
            model = [x for x in model if x.ticket != op[1]]
        model.sort(key=key)
        assert q.ordered() == model and len(q) <= capacity
