"""One pool's bookings as a scheduler replica holds them (pure): what the adapter feeds, in one fold.

- The bookings stream (`apply`): every replica applies every event of `KVR_BOOKINGS` in stream
  order to its `LoadTracker` (docs/protocol.md §4; the rules of each event are in `load.py`).
- Discovery removals (`worker_removed` / `worker_put`): the worker's legs are dropped, and while it
  is tombstoned an `add` for it is ignored and a `move` to it drops the leg it moves (as on a replica
  that applied the move before the removal). Bookings and discovery are different streams; this is
  what makes the order in which a replica sees them not matter for workers that stay removed.
- This replica's own adds, *provisionally* (`book` / `take_back`): a select applies the adds of its
  decision before it publishes them, so that selects decided while it waits for the stream see that
  load (without it a burst of requests all pick the same cheapest worker). Provisional legs count in
  the view but stream events (`prefill_complete`, `free`) never see them; when the stream delivers
  the add, its copy replaces the provisional one (a `free` may have cancelled the booking before it
  landed). A publish that failed, or that JetStream dropped as a duplicate of an earlier publish of
  the same booking, is taken back: the stream will not deliver it (again), so it must not stay here.

Time is passed in; nothing here reads a clock or does I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from schemas.bookings import BookingAdd, BookingEvent, BookingFree, BookingMove, BookingPrefillComplete
from services.runtime.workers import Tombstones

from .load import LegKey, LoadTracker


def leg_key(ev: BookingAdd) -> LegKey:
    return (ev.request_id, ev.booking_id, ev.leg)


class BookingState:
    def __init__(self, ttl_ms: int = 300_000, unconfirmed_ttl_ms: int = 0) -> None:
        self.tracker = LoadTracker(ttl_ms, unconfirmed_ttl_ms)
        self.removed = Tombstones()
        self.provisional: dict[LegKey, BookingAdd] = {}

    # --- the bookings stream -------------------------------------------------------------------

    def apply(self, ev: BookingEvent, now_ms: int) -> bool:
        """Fold one event of the stream; False when it changed nothing (a no-op by the rules)."""
        tracker = self.tracker
        if isinstance(ev, BookingAdd):
            if self.provisional.pop(leg_key(ev), None) is not None:
                # The stream's copy is authoritative (a free may have cancelled the booking before it
                # landed): replace ours with it.
                tracker.discard_leg(ev.request_id, ev.leg, ev.booking_id)
            return ev.worker_id not in self.removed and tracker.add(ev, now_ms)
        if isinstance(ev, BookingPrefillComplete):
            return tracker.prefill_complete(ev.request_id, ev.booking_id, ev.ts_ms, now_ms)
        if isinstance(ev, BookingMove):
            moved = tracker.move(ev.request_id, (ev.worker_id, ev.dp_rank), booking_id=ev.booking_id)
            if moved and ev.worker_id in self.removed:
                tracker.drop_worker(ev.worker_id)  # moved onto a removed worker: gone with it
            return moved
        assert isinstance(ev, BookingFree)
        return tracker.free(ev.request_id, ev.booking_id, ev.ts_ms, now_ms)

    # --- discovery -----------------------------------------------------------------------------

    def worker_put(self, worker_id: int) -> None:
        self.removed.put(worker_id)

    def worker_removed(self, worker_id: int) -> list[str]:
        """Drop the worker's legs (live, dormant and provisional ones); returns the request ids of
        the live legs released."""
        self.removed.remove(worker_id)
        dropped = self.tracker.drop_worker(worker_id)
        for key in [k for k, ev in self.provisional.items() if ev.worker_id == worker_id]:
            del self.provisional[key]
        return dropped

    # --- this replica's own bookings -----------------------------------------------------------

    def book(self, events: Iterable[BookingAdd], now_ms: int) -> list[BookingAdd]:
        """Apply a decision's adds provisionally, before they are published; returns those applied
        (an add of a known leg or of a cancelled booking is a no-op here as in the stream)."""
        mine: list[BookingAdd] = []
        for ev in events:
            if ev.worker_id not in self.removed and self.tracker.add(ev, now_ms, provisional=True):
                self.provisional[leg_key(ev)] = ev
                mine.append(ev)
        return mine

    def take_back(self, events: Sequence[BookingAdd]) -> None:
        """Remove provisional adds that the stream will not deliver (publish failed, or dropped by
        JetStream as a duplicate); an add whose stream copy arrived already is left alone."""
        for ev in events:
            if self.provisional.pop(leg_key(ev), None) is not None:
                self.tracker.discard_leg(ev.request_id, ev.leg, ev.booking_id)
