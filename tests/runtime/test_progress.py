"""FollowerProgress: caught up only from the server's account, lag from stream timestamps and stalls."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from services.runtime.progress import FollowerProgress, lost_sequences


def test_caught_up_needs_a_zero_pending_account_not_time() -> None:
    p = FollowerProgress(started=100.0)
    assert not p.caught_up and p.lag_s(105.0) == 5.0  # unknown yet: counts from start
    p.applied(num_pending=3, stored_s=90.0, now=101.0)
    assert not p.caught_up and p.pending == 3
    assert p.lag_s(101.0) == 11.0  # the message waited 11 s in the stream
    p.applied(num_pending=0, stored_s=100.5, now=102.0)
    assert p.caught_up and p.caught_up_at == 102.0 and p.lag_s(500.0) == 0.0


def test_consumer_info_counts_in_flight_messages_as_behind() -> None:
    p = FollowerProgress(started=0.0)
    p.server_account(num_pending=0, delivered_seq=10, applied_seq=7, now=1.0)
    assert not p.caught_up and p.pending == 1
    p.server_account(num_pending=0, delivered_seq=10, applied_seq=10, now=2.0, unapplied=0)
    assert p.caught_up and p.pending == 0
    p.server_account(num_pending=2, delivered_seq=10, applied_seq=10, now=3.0, unapplied=4)
    assert p.pending == 6


def test_a_stall_with_messages_pending_grows_the_lag_and_readiness_follows() -> None:
    p = FollowerProgress(started=0.0)
    p.applied(0, 0.9, 1.0)
    assert p.ready(1.0, max_lag_s=5.0)
    p.server_account(num_pending=4, delivered_seq=1, applied_seq=1, now=2.0)  # e.g. paused
    assert p.lag_s(3.0) == 2.0 and p.ready(3.0, 5.0)
    assert p.lag_s(7.5) == 6.5 and not p.ready(7.5, 5.0)
    assert p.ready(7.5, 0.0)  # 0 = no lag limit
    p.applied(0, 7.0, 8.0)
    assert p.ready(8.0, 5.0)


def test_replayed_messages_do_not_make_the_state_look_stale() -> None:
    p = FollowerProgress(started=0.0)
    p.applied(5, stored_s=1.0, now=1000.0, replayed=True)
    assert p.lag_s(1000.0) == 0.0


@given(
    st.lists(
        st.tuples(st.sampled_from(["applied", "account"]), st.integers(0, 5), st.floats(0, 10), st.booleans()),
        max_size=30,
    )
)
def test_lag_is_never_negative_and_zero_exactly_when_nothing_is_pending(steps) -> None:
    p = FollowerProgress(started=0.0)
    now = 0.0
    zero_seen = False
    for kind, pending, dt, flag in steps:
        now += dt
        if kind == "applied":
            p.applied(pending, now - dt / 2, now, replayed=flag)
        else:
            p.server_account(pending, delivered_seq=5, applied_seq=5 if flag else 4, now=now)
        zero_seen = zero_seen or p.pending == 0
        lag = p.lag_s(now + 1.0)
        assert lag >= 0.0
        assert (lag == 0.0) == (p.pending == 0)
        assert p.caught_up == zero_seen  # caught up iff the server ever said "nothing pending"


def test_lost_sequences() -> None:
    assert lost_sequences(stream_first_seq=1, next_seq=1) == 0
    assert lost_sequences(stream_first_seq=21, next_seq=6) == 15
    assert lost_sequences(stream_first_seq=101, next_seq=50) == 51  # emptied stream: first = last + 1
    assert lost_sequences(stream_first_seq=0, next_seq=1) == 0  # never used
