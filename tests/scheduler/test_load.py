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


def model_view(t: LoadTracker, target):
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


# --- bookings per attempt, unconfirmed window, cancels (issue 15) --------------------------------


def test_bookings_are_per_attempt_so_a_reused_request_id_books_again():
    t = LoadTracker()
    assert t.add(add("r", 1, [1], bid="b1"), NOW)
    assert t.free("r", "b1", NOW, NOW)
    assert t.add(add("r", 1, [1], bid="b2"), NOW)  # the same request id, booked again after its free
    assert t.is_active("r") and t.bookings_of("r") == ["b2"]
    assert not t.add(add("r", 2, [9], bid="b2"), NOW)  # a repeat of the same attempt: a duplicate
    assert t.add(add("r", 2, [9], bid="b3"), NOW)  # two attempts at once (two replicas): both count
    assert t.view((1, 0)).active_requests == 1 and t.view((2, 0)).active_requests == 1
    assert t.free("r", "b3", NOW, NOW) and t.bookings_of("r") == ["b2"]
    assert t.add(add("r", 2, [9], bid="b4"), NOW)
    assert t.free("r", "", NOW, NOW)  # no booking named: every booking of the request id
    assert t.targets() == [] and not t.is_active("r")


def test_an_unconfirmed_leg_ends_at_its_deadline_a_confirmed_one_at_the_ttl():
    t = LoadTracker(ttl_ms=10_000, unconfirmed_ttl_ms=1_000)
    t.add(add("a", 1, [1], ts=1_000, bid="x"), 1_000)
    t.add(add("b", 1, [2], ts=1_000, bid="y"), 1_000)
    assert t.prefill_complete("b", "y", 1_500, 1_500)
    assert t.expire(1_999) == [] and t.expire(2_000) == ["a"]
    assert t.request_ids() == ["b"] and list(t.dormant) == [("a", "x", "")]
    assert not t.prefill_complete("a", "x", 2_000, 2_100)  # stamped at its deadline: too late
    assert t.expire(10_999) == [] and t.expire(11_000) == ["b"]
    assert t.targets() == [] and not t.dormant


def test_a_prefill_complete_stamped_before_the_deadline_revives_the_leg_whenever_it_arrives():
    # Replica A applies the prefill_complete live; replica B sweeps first and applies it late; C
    # replays everything at start. All three end with the same view.
    events = [add("a", 1, [1, 2], ts=1_000, bid="x"), ("pc", "a", "x", 1_900)]
    a, b, c = (LoadTracker(ttl_ms=10_000, unconfirmed_ttl_ms=1_000) for _ in range(3))
    a.add(events[0], 1_000)
    a.prefill_complete("a", "x", 1_900, 1_900)
    b.add(events[0], 1_000)
    assert b.expire(2_500) == ["a"] and b.view((1, 0)) == EMPTY
    assert b.prefill_complete("a", "x", 1_900, 2_500)  # revived
    c.add(events[0], 5_000)  # replayed after its deadline: dormant
    assert c.view((1, 0)) == EMPTY
    c.prefill_complete("a", "x", 1_900, 5_000)
    for t in (a, b, c):
        t.expire(5_000)
        assert t.view((1, 0)) == LoadView(0, 2, 1)
    assert a.digest() == b.digest() == c.digest()


def test_a_free_of_a_booking_not_yet_added_cancels_it_within_the_ttl():
    t = LoadTracker(ttl_ms=1_000)
    assert not t.free("late", "b", 1_000, 1_000)  # the caller gave up; nothing booked yet
    assert not t.add(add("late", 1, [1], ts=1_500, bid="b"), 1_500)  # the select books late: void
    assert t.cancelled == 1 and not t.is_active("late")
    assert t.add(add("late", 1, [1], ts=1_500, bid="c"), 1_500)  # another attempt books
    assert not t.add(add("late", 1, [1], ts=1_999, bid="b"), 1_999) and t.add(add("late", 2, [1], ts=2_000, bid="b"), 2_000)
    t.expire(2_999)
    assert ("late", "b") in t.cancels
    t.expire(3_000)  # free ts + 2 ttl: no add it could still stop can arrive any more
    assert not t.cancels
    assert not t.free("x", "", 1, 1) and not t.cancels  # a free naming no booking cancels nothing


def test_provisional_legs_count_but_stream_events_do_not_see_them():
    t = LoadTracker(ttl_ms=10_000, unconfirmed_ttl_ms=1_000)
    ev = add("r", 1, [1, 2], ts=1_000, bid="b")
    assert t.add(ev, 1_000, provisional=True) and t.view((1, 0)).active_requests == 1
    assert not t.prefill_complete("r", "b", 1_100, 1_100)
    assert not t.free("r", "b", 1_100, 1_100)  # from the stream: the add has not landed, so a cancel
    assert t.discard_leg("r", "", "b") and t.view((1, 0)) == EMPTY
    assert not t.add(ev, 1_200)  # the stream's copy of the add arrives after the free: void


# A brute-force model of the fold: every event kept, the view computed from scratch at `now`.
def model_fold(events: list[tuple], now: int, ttl: int, unconfirmed: int) -> dict:
    recs: dict[tuple[str, str, str], dict] = {}
    cancels: dict[tuple[str, str], int] = {}
    for ev in events:
        kind, rid, bid, ts = ev[0], ev[1], ev[2], ev[3]
        if kind == "add":
            _, _, _, _, leg, wid, hashes, isl = ev
            key = (rid, bid, leg)
            if key in recs or (bid and (rid, bid) in cancels and ts < cancels[(rid, bid)] + ttl):
                continue
            window = unconfirmed if 0 < unconfirmed < ttl else ttl
            recs[key] = {"wid": wid, "hashes": set(hashes), "prefill": isl, "end": ts + ttl, "deadline": ts + window,
                         "confirmed": window >= ttl, "gone": False}
            continue
        mine = [(k, r) for k, r in recs.items() if k[0] == rid and (not bid or k[1] == bid) and not r["gone"]]
        if kind == "move":
            for k, r in mine:
                if k[2] == "":
                    r["wid"] = ev[4]
        elif kind == "pc":
            for k, r in mine:
                if not r["confirmed"] and ts >= r["deadline"]:
                    continue
                r["confirmed"] = True
                if k[2] == "prefill":
                    r["gone"] = True
                else:
                    r["prefill"] = 0
        else:
            for _, r in mine:
                r["gone"] = True
            if not mine and bid:
                cancels[(rid, bid)] = ts
    view: dict[tuple[int, int], LoadView] = {}
    for wid in (1, 2):
        alive = [r for r in recs.values() if r["wid"] == wid and not r["gone"]
                 and now < (r["end"] if r["confirmed"] else r["deadline"])]
        blocks = set().union(*(r["hashes"] for r in alive)) if alive else set()
        view[(wid, 0)] = LoadView(sum(r["prefill"] for r in alive), len(blocks), len(alive)) if alive else EMPTY
    return view


@st.composite
def booking_streams(draw):
    """Booking events in stream order with their stamps, as several replicas would publish them:
    stamps wander (clock skew, publish delays), attempts are unique, a free may come before the add
    of its booking (a select that books after its caller gave up)."""
    events: list[tuple] = []
    ts = 1_000  # a stamp of 0 means "not stamped" (the applying replica's clock)
    attempts: list[tuple[str, str]] = []
    freed_early: list[tuple[str, str]] = []
    for n in range(draw(st.integers(0, 30))):
        ts += draw(st.integers(0, 250))
        stamp = max(1, ts + draw(st.integers(-100, 100)))
        kind = draw(st.sampled_from(["add", "add", "pc", "pc", "free", "move"]))
        if kind == "add":
            if freed_early and draw(st.booleans()):
                rid, bid = freed_early.pop(0)
            else:
                rid, bid = f"r{draw(st.integers(0, 3))}", f"b{n}"
            attempts.append((rid, bid))
            wid = draw(st.integers(1, 2))
            hashes = draw(st.lists(st.integers(1, 6), max_size=4))
            if draw(st.booleans()):  # disaggregated: a prefill leg too
                events.append(("add", rid, bid, stamp, "prefill", 3 - wid, hashes, 32))
            events.append(("add", rid, bid, stamp, "", wid, hashes, draw(st.integers(0, 64))))
            continue
        choice = draw(st.sampled_from(["known", "known", "any", "early"]))
        if choice == "known" and attempts:
            rid, bid = draw(st.sampled_from(attempts))
        elif choice == "early" and kind == "free":
            rid, bid = f"r{draw(st.integers(0, 3))}", f"e{n}"
            freed_early.append((rid, bid))
        else:
            rid, bid = f"r{draw(st.integers(0, 3))}", ""
        events.append((kind, rid, bid, stamp, draw(st.integers(1, 2))) if kind == "move" else (kind, rid, bid, stamp))
    return events


def apply(t: LoadTracker, ev: tuple, at: int) -> None:
    kind, rid, bid, ts = ev[0], ev[1], ev[2], ev[3]
    if kind == "add":
        _, _, _, _, leg, wid, hashes, isl = ev
        t.add(add(rid, wid, hashes, isl=isl, leg=leg, ts=ts, bid=bid, track=True), at)
    elif kind == "pc":
        t.prefill_complete(rid, bid, ts, at)
    elif kind == "move":
        t.move(rid, (ev[4], 0), booking_id=bid)
    else:
        t.free(rid, bid, ts, at)


@settings(max_examples=150, deadline=None)
@given(booking_streams(), st.data())
def test_every_replica_reaches_the_model_view_whatever_it_applied_when(events, data):
    ttl, unconfirmed = 2_000, 300
    last = max((ev[3] for ev in events), default=0)
    now = last + data.draw(st.integers(0, 3_000))
    replicas = []
    for _ in range(3):
        t = LoadTracker(ttl_ms=ttl, unconfirmed_ttl_ms=unconfirmed)
        # Apply times: live with some lag, or a replay that starts late; sweeps in between.
        at = data.draw(st.integers(0, now))
        for ev in events:
            at = min(now, max(at, ev[3]) + data.draw(st.integers(0, 300)))
            if data.draw(st.booleans()):
                t.expire(at)
            apply(t, ev, at)
        t.expire(now)
        replicas.append(t)
    want = model_fold(events, now, ttl, unconfirmed)
    for t in replicas:
        assert {(w, 0): t.view((w, 0)) for w in (1, 2)} == want
        assert all(v.active_prefill_tokens >= 0 for v in want.values())
    assert replicas[0].digest() == replicas[1].digest() == replicas[2].digest()
