"""Load tracker (pure): prefill tokens, ref-counted active blocks, idempotence, expiry, legs."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from services.scheduler.load import EMPTY, LoadTracker, LoadView

from .helpers import add

NOW = 2_000


def test_prefill_tokens_are_uncached_tokens_and_shared_prefix_counts_once():
    t = LoadTracker(ttl_ms=300_000)
    assert t.add(add("a", 1, [1, 2, 3], isl=48, overlap=1), NOW)
    assert t.add(add("b", 1, [1, 2, 9], isl=50, overlap=0), NOW)
    # a: 48 − 16 = 32 prefill tokens; b: 50. Blocks {1,2,3} ∪ {1,2,9} = 4 unique.
    assert t.view((1, 0)) == LoadView(active_prefill_tokens=82, active_blocks=4, active_requests=2)
    assert t.new_blocks((1, 0), [1, 2, 7, 8]) == 2
    assert t.new_blocks((2, 0), [1, 2, 7, 8]) == 4


def test_overlap_larger_than_isl_clamps_to_zero():
    t = LoadTracker()
    t.add(add("a", 1, [1], isl=10, overlap=4), NOW)
    assert t.view((1, 0)).active_prefill_tokens == 0


def test_duplicate_add_unknown_free_and_repeated_prefill_complete_are_noops():
    t = LoadTracker()
    assert t.add(add("a", 1, [1, 2]), NOW)
    before = t.digest()
    assert not t.add(add("a", 2, [5, 6, 7]), NOW)  # same request id (and leg): ignored
    assert t.digest() == before and t.view((2, 0)) == EMPTY
    assert not t.free("nope") and not t.prefill_complete("nope")
    assert t.prefill_complete("a")
    after_pc = t.view((1, 0))
    assert after_pc == LoadView(0, 2, 1)
    assert t.prefill_complete("a")  # still active, nothing more to release
    assert t.view((1, 0)) == after_pc
    assert t.free("a") and not t.free("a")
    assert t.view((1, 0)) == EMPTY and t.targets() == [] and not t.is_active("a")


def test_free_of_one_request_keeps_shared_blocks_of_the_other():
    t = LoadTracker()
    t.add(add("a", 1, [1, 2, 3]), NOW)
    t.add(add("b", 1, [1, 2]), NOW)
    t.free("a")
    assert t.view((1, 0)) == LoadView(32, 2, 1)


def test_expiry_from_event_timestamp():
    t = LoadTracker(ttl_ms=1_000)
    t.add(add("a", 1, [1], ts=1_000), 1_000)
    t.add(add("b", 1, [2], ts=1_500), 1_500)
    assert t.expire(1_999) == []
    assert t.expire(2_000) == ["a"]
    assert t.request_ids() == ["b"]
    assert t.expire(10_000) == ["b"] and t.targets() == []
    # A replayed add that is already past its TTL is not applied at all.
    assert not t.add(add("old", 1, [3], ts=1_000), 5_000)


def test_expiry_heap_ignores_freed_and_readded_legs():
    t = LoadTracker(ttl_ms=1_000)
    t.add(add("a", 1, [1], ts=1_000), 1_000)
    t.free("a")
    t.add(add("a", 1, [1], ts=1_800), 1_800)
    assert t.expire(2_100) == []  # the old heap entry no longer matches the live leg
    assert t.expire(2_800) == ["a"]


def test_disaggregated_legs():
    t = LoadTracker()
    t.add(add("r", 10, [1, 2, 3], isl=48, overlap=1, leg="prefill"), NOW)
    t.add(add("r", 20, [1, 2, 3], isl=48, overlap=1, leg="", track=False), NOW)
    assert t.view((10, 0)) == LoadView(32, 3, 1)
    assert t.view((20, 0)) == LoadView(0, 3, 1)
    # prefill_complete: the prefill leg is released completely, the decode leg keeps its blocks.
    t.prefill_complete("r")
    assert t.view((10, 0)) == EMPTY
    assert t.view((20, 0)) == LoadView(0, 3, 1)
    t.free("r")
    assert t.targets() == [] and not t.is_active("r")


def test_drop_worker_releases_all_its_ranks():
    t = LoadTracker()
    t.add(add("a", 1, [1], rank=0), NOW)
    t.add(add("b", 1, [2], rank=1), NOW)
    t.add(add("c", 2, [3]), NOW)
    assert sorted(t.drop_worker(1)) == ["a", "b"]
    assert t.targets() == [(2, 0)] and t.request_ids() == ["c"]


ops = st.lists(
    st.tuples(
        st.sampled_from(["add", "pc", "free", "expire", "move"]),
        st.integers(0, 5),  # request id
        st.integers(1, 3),  # worker
        st.lists(st.integers(1, 6), max_size=5),
        st.integers(0, 3),  # overlap
    ),
    max_size=40,
)


def model_view(t: LoadTracker, target):  # type: ignore[no-untyped-def]
    legs = [leg for leg in t.legs.values() if leg.target == target]
    blocks = set()
    for leg in legs:
        blocks |= set(leg.hashes)
    return LoadView(sum(leg.prefill_tokens for leg in legs), len(blocks), len(legs))


@settings(max_examples=150, deadline=None)
@given(ops)
def test_views_match_a_recount_and_everything_frees_to_empty(seq):
    t = LoadTracker(ttl_ms=50)
    now = 0
    for op, rid, wid, hashes, overlap in seq:
        now += 7
        r = f"r{rid}"
        if op == "add":
            t.add(add(r, wid, hashes, overlap=overlap, ts=now), now)
        elif op == "pc":
            t.prefill_complete(r)
        elif op == "free":
            t.free(r)
        elif op == "move":
            t.move(r, (wid, 0))
        else:
            t.expire(now)
        for target in {(w, 0) for w in (1, 2, 3)}:
            assert t.view(target) == model_view(t, target)
            assert t.view(target).active_prefill_tokens >= 0
    for r in list(t.request_ids()):
        t.free(r)
    assert t.targets() == [] and t.legs == {} and t.ranks == {}


def test_discard_leg_leaves_no_trace():
    from schemas.bookings import BookingAdd
    from services.scheduler.load import LoadTracker

    fresh, t = LoadTracker(), LoadTracker()
    ev = BookingAdd(request_id="r", router_id="a", pool="p", worker_id=1, isl_tokens=64, sequence_hashes=[1, 2], ts_ms=1000)
    assert t.add(ev, 1000)
    assert t.discard_leg("r", "") and not t.discard_leg("r", "")
    assert t.digest() == fresh.digest() and t.view((1, 0)) == fresh.view((1, 0)) and t.duplicates == 0
    assert t.add(ev, 1000)  # the stream's copy can be applied afterwards


def test_move_carries_the_decode_leg_with_its_load_and_expiry():
    t = LoadTracker(ttl_ms=1_000)
    t.add(add("a", 1, [1, 2, 3], isl=64, overlap=1, ts=1_000), 1_000)
    t.add(add("b", 1, [1, 2], ts=1_000), 1_000)
    before = t.view((1, 0))
    assert t.move("a", (2, 1))
    # a's 48 prefill tokens and its blocks are on (2, 1) now; b still holds the shared blocks 1, 2 on (1, 0)
    assert t.view((2, 1)) == LoadView(48, 3, 1)
    assert t.view((1, 0)) == LoadView(before.active_prefill_tokens - 48, 2, 1)
    assert not t.move("a", (2, 1))  # already there
    assert not t.move("nope", (2, 0)) and not t.move("a", (3, 0), leg="prefill")
    assert t.prefill_complete("a") and t.view((2, 1)).active_prefill_tokens == 0
    assert sorted(t.expire(2_000)) == ["a", "b"]
    assert t.targets() == [] and t.legs == {}


def test_move_leaves_the_prefill_leg_where_it_is():
    t = LoadTracker()
    t.add(add("a", 1, [1, 2], leg="prefill"), NOW)
    t.add(add("a", 2, [1, 2], track=False), NOW)
    assert t.move("a", (3, 0))
    assert t.view((1, 0)) == LoadView(32, 2, 1) and t.view((2, 0)) == EMPTY and t.view((3, 0)) == LoadView(0, 2, 1)
    assert t.free("a") and t.targets() == []
