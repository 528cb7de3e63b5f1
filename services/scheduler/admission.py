"""The admission queue's rule (Dynamo's scheduling queue, GAIE's flow control), pure.

When every eligible target of a booking select is over the busy thresholds, the request waits here
instead of being refused at once. The order is Dynamo's `wspt` queue policy: the strict-priority
tier first (higher first, `agent_hints.strict_priority`), then the weighted shortest processing
time `(1 + priority_jump) / max(1, isl − best cached tokens)` (higher first: short uncached prefills
and a priority jump `agent_hints.priority`, negatives counted as 0), then arrival order. Which
waiting request may go is decided by the caller's test — the selection's own eligibility rule
(`Selector.has_capacity`) — in this order; a request whose own eligible targets are still busy
does not hold back one whose targets are free (no head-of-line blocking across constraints).

The queue is bounded: when full, a newcomer that ranks above the last waiting request takes its
place (the last one is evicted and answered `overloaded`); otherwise the newcomer is refused.
Every waiting request has a deadline; past it, it leaves the queue (`overloaded` with a retry hint).

No I/O and no clock: times are passed in. The scheduler service holds one per pool (per replica:
each replica queues the selects it received) and wakes waiters from its bookings feed.
"""

from __future__ import annotations

from bisect import insort
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple


def wspt(priority: int, isl_tokens: int, cached_tokens: int) -> float:
    """Dynamo's WSPT key: (1 + priority jump) / max(1, uncached prompt tokens); negatives count as 0.
    ISL 1024 with 60 cached blocks of 16 → 1/64."""
    return (1 + max(priority, 0)) / max(1, isl_tokens - cached_tokens)


@dataclass(frozen=True, slots=True)
class Waiting:
    """One queued request (`ticket` is its arrival order on this replica, unique)."""

    ticket: int
    request_id: str
    enqueued_ms: int
    deadline_ms: int
    strict_priority: int = 0
    priority: int = 0
    isl_tokens: int = 0
    cached_tokens: int = 0
    order: tuple[int, float, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Smaller sorts first: higher tier, then higher WSPT, then earlier arrival.
        object.__setattr__(self, "order", (-self.strict_priority, -wspt(self.priority, self.isl_tokens, self.cached_tokens), self.ticket))


class Offer(NamedTuple):
    """The queue's answer to a newcomer: queued or not, and whom it displaced (to answer `overloaded`)."""

    queued: bool
    evicted: Waiting | None = None


class AdmissionQueue:
    def __init__(self, capacity: int) -> None:
        self.capacity = max(0, capacity)
        self._items: list[tuple[tuple[int, float, int], Waiting]] = []  # sorted by `Waiting.order`
        self._by_ticket: dict[int, Waiting] = {}

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, ticket: int) -> bool:
        return ticket in self._by_ticket

    def ordered(self) -> list[Waiting]:
        """The waiting requests in admission order."""
        return [w for _, w in self._items]

    def offer(self, w: Waiting) -> Offer:
        """Queue `w` if there is room, or if it ranks above the last waiting request (evicted)."""
        if w.ticket in self._by_ticket:
            return Offer(True)
        if self.capacity == 0:
            return Offer(False)
        evicted = None
        if len(self._items) >= self.capacity:
            last = self._items[-1][1]
            if not w.order < last.order:
                return Offer(False)
            self._drop(last.ticket)
            evicted = last
        insort(self._items, (w.order, w))
        self._by_ticket[w.ticket] = w
        return Offer(True, evicted)

    def remove(self, ticket: int) -> bool:
        """Take a request out (admitted, gave up, deadline passed); False if it was not waiting."""
        if ticket not in self._by_ticket:
            return False
        self._drop(ticket)
        return True

    def expire(self, now_ms: int) -> list[Waiting]:
        """Remove and return the requests whose deadline has passed."""
        gone = [w for _, w in self._items if w.deadline_ms <= now_ms]
        for w in gone:
            self._drop(w.ticket)
        return gone

    def next_admissible(self, admissible: Callable[[Waiting], bool]) -> Waiting | None:
        """The first waiting request, in admission order, that `admissible` lets through (the
        selection's own eligibility test on the current load); it leaves the queue."""
        for _, w in self._items:
            if admissible(w):
                self._drop(w.ticket)
                return w
        return None

    def _drop(self, ticket: int) -> None:
        w = self._by_ticket.pop(ticket)
        for i, (_, item) in enumerate(self._items):
            if item.ticket == ticket:
                del self._items[i]
                return
        raise AssertionError(f"ticket {w.ticket} indexed but not queued")
