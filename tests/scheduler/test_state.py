"""BookingState (pure): the bookings stream, discovery removals and provisional own adds in one fold.

The property tests compare replicas against a brute-force model (`model_view`): every event kept,
the view recomputed from scratch. Whatever a replica booked provisionally, whatever it took back,
and wherever the removal of a worker fell in its bookings stream, it ends where the model says.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.bookings import BookingAdd, BookingFree, BookingMove, BookingPrefillComplete
from services.scheduler.load import EMPTY, LoadView
from services.scheduler.state import BookingState

from .helpers import add

pytestmark = pytest.mark.unit

TTL, UNCONFIRMED = 2_000, 300
STABLE = (1, 2)  # workers that stay registered
GONE = 3  # a worker that discovery may delete (and never put again)


def free(rid: str, bid: str = "", ts: int = 1_000) -> BookingFree:
    return BookingFree(request_id=rid, router_id="r", pool="p", ts_ms=ts, booking_id=bid)


def done(rid: str, bid: str = "", ts: int = 1_000) -> BookingPrefillComplete:
    return BookingPrefillComplete(request_id=rid, router_id="r", pool="p", ts_ms=ts, booking_id=bid)


def move(rid: str, wid: int, bid: str = "", ts: int = 1_000) -> BookingMove:
    return BookingMove(request_id=rid, router_id="r", pool="p", ts_ms=ts, booking_id=bid, worker_id=wid)


def views(s: BookingState) -> dict[tuple[int, int], LoadView]:
    return {(w, 0): s.tracker.view((w, 0)) for w in (*STABLE, GONE)}


# --- examples --------------------------------------------------------------------------------------


def test_provisional_add_counts_until_the_stream_copy_replaces_it() -> None:
    s = BookingState(TTL, UNCONFIRMED)
    ev = add("r", 1, [1, 2], ts=1_000, bid="b")
    assert s.book([ev], 1_000) == [ev] and s.tracker.view((1, 0)).active_requests == 1
    assert s.book([ev], 1_001) == []  # a known leg: no second copy
    assert not s.apply(done("r", "b", 1_050), 1_050)  # the stream has not delivered the add yet
    assert s.apply(ev, 1_100) and not s.provisional
    assert s.apply(done("r", "b", 1_150), 1_150) and s.tracker.view((1, 0)) == LoadView(0, 2, 1)


def test_a_cancelled_booking_is_void_when_its_copy_lands_and_a_failed_publish_is_taken_back() -> None:
    s = BookingState(TTL, UNCONFIRMED)
    late = add("late", 1, [1], ts=1_000, bid="b1")
    s.book([late], 1_000)
    assert not s.apply(free("late", "b1", 1_010), 1_010)  # a cancel: the add is not in the stream yet
    assert not s.apply(late, 1_020) and s.tracker.view((1, 0)) == EMPTY and not s.provisional
    lost = add("lost", 2, [5], ts=1_030, bid="b2")
    s.book([lost], 1_030)
    s.take_back([lost])
    assert s.tracker.view((2, 0)) == EMPTY and not s.provisional
    s.take_back([lost])  # twice: nothing left to take


def test_a_removed_worker_loses_its_legs_and_later_adds_until_put_again() -> None:
    s = BookingState(TTL, UNCONFIRMED)
    s.apply(add("a", 3, [1], ts=1_000), 1_000)
    s.book([add("p", 3, [2], ts=1_000, bid="x")], 1_000)
    assert s.worker_removed(3) == ["a", "p"] and not s.provisional
    assert not s.apply(add("b", 3, [1], ts=1_010), 1_010) and s.tracker.view((3, 0)) == EMPTY
    assert s.book([add("c", 3, [1], ts=1_010)], 1_010) == []
    s.worker_put(3)
    assert s.apply(add("d", 3, [1], ts=1_020), 1_020) and s.tracker.view((3, 0)).active_requests == 1


@pytest.mark.parametrize("removal_first", [False, True])
def test_a_move_onto_a_removed_worker_ends_the_same_in_either_order(removal_first: bool) -> None:
    s = BookingState(TTL, UNCONFIRMED)
    s.apply(add("r", 1, [1, 2], ts=1_000), 1_000)
    if removal_first:
        s.worker_removed(3)
    s.apply(move("r", 3, ts=1_010), 1_010)
    if not removal_first:
        s.worker_removed(3)
    assert views(s) == {(1, 0): EMPTY, (2, 0): EMPTY, (3, 0): EMPTY} and not s.tracker.is_active("r")


# --- the property: any interleaving, any provisional history, the model's view ----------------------


@st.composite
def scenario(draw):
    """A bookings stream (events with stamps, as replicas publish them), whether worker 3 is removed
    (never put again), and for each of 3 replicas: where the removal falls in its bookings stream,
    which adds it made itself (booked provisionally some steps before their copy arrives), which
    publishes of its own failed (booked, then taken back, never in the stream), and apply times."""
    events: list = []
    ts = 1_000
    rids = [f"r{i}" for i in range(4)]
    for n in range(draw(st.integers(0, 25))):
        ts += draw(st.integers(0, 250))
        stamp = max(1, ts + draw(st.integers(-100, 100)))
        kind = draw(st.sampled_from(["add", "add", "add", "pc", "free", "move"]))
        if kind == "add":
            wid = draw(st.sampled_from([1, 2, GONE]))
            # Requests booked on the worker that may go are never moved (a move *away* from a removed
            # worker is not order-independent, see docs/scheduler.md).
            rid = f"z{draw(st.integers(0, 3))}" if wid == GONE else draw(st.sampled_from(rids))
            hashes = draw(st.lists(st.integers(1, 6), max_size=4))
            if wid != GONE and draw(st.booleans()):  # disaggregated: a prefill leg on the other stable worker
                events.append(add(rid, 3 - wid, hashes, isl=32, leg="prefill", ts=stamp, bid=f"b{n}"))
            events.append(add(rid, wid, hashes, isl=draw(st.integers(0, 64)), ts=stamp, bid=f"b{n}"))
            continue
        rid = draw(st.sampled_from([*rids, "z0"]))
        bid = draw(st.sampled_from(["", f"b{draw(st.integers(0, max(n, 0)))}", f"e{n}"]))
        if kind == "pc":
            events.append(done(rid, bid, stamp))
        elif kind == "free":
            events.append(free(rid, bid, stamp))
        elif not rid.startswith("z"):
            events.append(move(rid, draw(st.sampled_from(STABLE)), bid, stamp))
    removed = draw(st.booleans())
    replicas = []
    for _ in range(3):
        own = [i for i, ev in enumerate(events) if isinstance(ev, BookingAdd) and draw(st.booleans())]
        n_failed = draw(st.integers(0, 2))
        failed = [add(f"f{i}", draw(st.sampled_from(STABLE)), [7], ts=1_000 + 100 * i, bid=f"f{i}") for i in range(n_failed)]
        replicas.append({
            "removal_at": draw(st.integers(0, len(events))),
            "own": {i: draw(st.integers(0, 3)) for i in own},  # booked this many events before its copy
            "failed": [(draw(st.integers(0, len(events))), ev) for ev in failed],
            "lags": [draw(st.integers(0, 300)) for _ in events],
            "sweeps": [draw(st.booleans()) for _ in events],
        })
    last = max((ev.ts_ms for ev in events), default=1_000)
    return events, removed, replicas, last + draw(st.integers(0, 3_000))


def model_view(events: list, removed: bool, now: int) -> dict[tuple[int, int], LoadView]:
    """Brute force: keep every add, decide each leg's fate from the events about it, count what is
    alive at `now` on a worker that is still there."""
    legs: dict[tuple[str, str, str], dict] = {}
    cancels: dict[tuple[str, str], int] = {}
    for ev in events:
        rid, bid, ts = ev.request_id, ev.booking_id, ev.ts_ms
        if isinstance(ev, BookingAdd):
            key = (rid, bid, ev.leg)
            if key in legs or (bid and (rid, bid) in cancels and ts < cancels[(rid, bid)] + TTL):
                continue
            prefill = max(ev.isl_tokens - ev.overlap_blocks * ev.block_size, 0) if ev.track_prefill_tokens else 0
            legs[key] = {"wid": ev.worker_id, "hashes": set(ev.sequence_hashes), "prefill": prefill, "end": ts + TTL,
                         "deadline": ts + UNCONFIRMED, "confirmed": False, "gone": False}
            continue
        mine = [(k, leg) for k, leg in legs.items() if k[0] == rid and (not bid or k[1] == bid) and not leg["gone"]]
        if isinstance(ev, BookingMove):
            for k, leg in mine:
                if k[2] == "":
                    leg["wid"] = ev.worker_id
        elif isinstance(ev, BookingPrefillComplete):
            for k, leg in mine:
                if leg["confirmed"] or ts < leg["deadline"]:
                    leg["confirmed"] = True
                    if k[2] == "prefill":
                        leg["gone"] = True
                    else:
                        leg["prefill"] = 0
        else:
            for _, leg in mine:
                leg["gone"] = True
            if not mine and bid:
                cancels[(rid, bid)] = ts
    view = {}
    for wid in (*STABLE, GONE):
        alive = [leg for leg in legs.values() if leg["wid"] == wid and not leg["gone"] and not (removed and wid == GONE)
                 and now < (leg["end"] if leg["confirmed"] else leg["deadline"])]
        blocks = set().union(*(leg["hashes"] for leg in alive)) if alive else set()
        view[(wid, 0)] = LoadView(sum(leg["prefill"] for leg in alive), len(blocks), len(alive)) if alive else EMPTY
    return view


def run_replica(events: list, removed: bool, plan: dict, now: int) -> BookingState:
    s = BookingState(TTL, UNCONFIRMED)
    due: dict[int, list[BookingAdd]] = {}  # stream position → own adds booked just before it
    for i, back in plan["own"].items():
        due.setdefault(max(0, i - back), []).append(events[i])
    failed: dict[int, list[BookingAdd]] = {}
    for at, ev in plan["failed"]:
        failed.setdefault(at, []).append(ev)
    at = 1_000
    for i in range(len(events) + 1):
        if removed and i == plan["removal_at"]:
            s.worker_removed(GONE)
        for ev in due.get(i, []):
            s.book([ev], max(at, ev.ts_ms))
        for ev in failed.get(i, []):
            s.book([ev], max(at, ev.ts_ms))
            s.take_back([ev])
        if i == len(events):
            break
        ev = events[i]
        at = min(now, max(at, ev.ts_ms) + plan["lags"][i])
        if plan["sweeps"][i]:
            s.tracker.expire(at)
        s.apply(ev, at)
    s.tracker.expire(now)
    return s


@settings(max_examples=200, deadline=None)
@given(scenario())
def test_every_replica_reaches_the_model_whatever_it_booked_itself_and_when_the_worker_left(case) -> None:
    events, removed, plans, now = case
    want = model_view(events, removed, now)
    replicas = [run_replica(events, removed, plan, now) for plan in plans]
    for s in replicas:
        assert views(s) == want
        assert not s.provisional  # every own add was delivered by the stream or taken back
    assert len({s.tracker.digest() for s in replicas}) == 1
