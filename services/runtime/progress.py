"""How far a stream follower is behind, from the server's own account. Pure: time is passed in.

A follower is *caught up* once JetStream says nothing of its filter is pending: a delivered message
whose metadata carries `num_pending = 0`, or consumer info with `num_pending = 0` while every message
the consumer delivered has been applied. Both are statements about the stream at a moment after the
follower started, so the state then reflects at least the stream as it was at start. A fetch that
simply times out says nothing (a slow-consumer disconnect or a large backlog look the same), so it
never counts.

`lag_s(now)` is 0 while nothing is pending. While something is, it is the larger of
- how long the last applied message waited in the stream before it was applied (stream timestamp →
  apply), i.e. how stale the state is while the follower works through a backlog, and
- how long since the follower last made progress (applied a message, or heard "nothing pending"),
  i.e. how stale it is while stuck (paused, disconnected, consumer lost).
Services compare it with `--max-ready-lag-s` for `/readyz`.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class FollowerProgress:
    started: float
    caught_up: bool = False
    pending: int | None = None  # messages of the filter not yet applied; None until the server said
    last_progress: float = field(init=False)
    last_delay: float = 0.0  # stream timestamp → apply of the last applied (non-replayed) message
    caught_up_at: float | None = None

    def __post_init__(self) -> None:
        self.last_progress = self.started

    def applied(self, num_pending: int, stored_s: float | None, now: float, *, replayed: bool = False) -> None:
        """A delivered message was applied; `num_pending` is from its metadata. Messages re-read on
        purpose (`replayed`) count as progress but say nothing about staleness."""
        self.pending = num_pending
        self.last_progress = now
        if not replayed and stored_s is not None:
            self.last_delay = max(0.0, now - stored_s)
        if num_pending == 0:
            self._caught_up(now)

    def server_account(self, num_pending: int, delivered_seq: int, applied_seq: int, now: float, unapplied: int = 0) -> None:
        """Consumer info: `num_pending` messages of the filter are not delivered yet, the last
        delivered one is `delivered_seq`, and `unapplied` delivered ones wait in this process (e.g.
        while paused). Delivered but not applied = in flight: still behind."""
        in_flight = max(unapplied, 1 if delivered_seq > applied_seq else 0)
        self.pending = num_pending + in_flight
        if self.pending == 0:
            self.last_progress = now
            self.last_delay = 0.0
            self._caught_up(now)

    def _caught_up(self, now: float) -> None:
        if not self.caught_up:
            self.caught_up = True
            self.caught_up_at = now

    def lag_s(self, now: float) -> float:
        if self.pending == 0:
            return 0.0
        if self.pending is None:
            return max(0.0, now - self.started)
        return max(self.last_delay, now - self.last_progress)

    def ready(self, now: float, max_lag_s: float) -> bool:
        """Caught up, and (with a positive `max_lag_s`) not lagging beyond it."""
        return self.caught_up and (max_lag_s <= 0 or self.lag_s(now) <= max_lag_s)


def lost_sequences(stream_first_seq: int, next_seq: int) -> int:
    """How many sequences the follower needed (from `next_seq` on) that the stream no longer holds:
    deleted by `max_age`, `max_bytes` or a purge before they were read (an emptied stream reports
    `first = last + 1`). Some may belong to subjects the follower does not read: an upper bound."""
    return max(0, stream_first_seq - next_seq)
