"""Per-rank ZMQ sequence tracking: in order, gap, engine restart, or already-replayed duplicate. Pure.

vLLM's ZMQ publisher numbers batches from 0 in every process. A forward jump means
PUB dropped messages (slow subscriber, HWM) and is repaired through the replay socket; a sequence
number that does not move forward means the engine restarted and its cache is gone. After a replay,
live messages already delivered by the replay are recognised and skipped.
"""

from __future__ import annotations

from enum import Enum


class SeqVerdict(Enum):
    FIRST = "first"  # first batch this relay sees from the rank
    NEXT = "next"  # seq == last + 1
    GAP = "gap"  # seq > last + 1: batches last+1 .. seq-1 are missing
    RESTART = "restart"  # seq <= last: the publisher started over
    DUPLICATE = "duplicate"  # already applied through a replay


class SeqTracker:
    def __init__(self) -> None:
        self.last: int | None = None
        # Live messages in (replay_floor, replay_ceiling] were already applied by a replay.
        self._replay_floor = -1
        self._replay_ceiling = -1

    def classify(self, seq: int) -> SeqVerdict:
        if self._replay_floor < seq <= self._replay_ceiling:
            return SeqVerdict.DUPLICATE
        if self.last is None:
            return SeqVerdict.FIRST
        if seq == self.last + 1:
            return SeqVerdict.NEXT
        if seq > self.last + 1:
            return SeqVerdict.GAP
        return SeqVerdict.RESTART

    def applied(self, seq: int) -> None:
        self.last = seq
        if seq > self._replay_ceiling:
            self._replay_floor = self._replay_ceiling = -1

    def replayed(self, trigger: int, through: int) -> None:
        """A replay triggered by live `trigger` applied batches up to `through`."""
        if through > trigger:
            self._replay_floor, self._replay_ceiling = trigger, through

    def reset(self) -> None:
        """Forget the publisher's numbering (it restarted): everything from 0 is new."""
        self.last = None
        self._replay_floor = self._replay_ceiling = -1


class PlaneSequencer:
    """Dynamo's event plane (`--source dynamo`): per-publisher message sequences, and which
    publisher feeds each dp rank. Pure.

    Dynamo's publishers have no replay socket, so a lost message cannot be fetched again: a forward
    jump of a publisher's sequence clears the ranks that publisher feeds (`unrecoverable_gap`); a
    rank first fed by a publisher is cleared (`start`, when clearing on start) and a rank fed by
    another publisher than before is cleared too (`engine_restart`: a restarted Dynamo publisher
    has a new `publisher_id`). A sequence that does not move forward is a duplicate (a broker
    delivering twice) and is skipped. At most `max_publishers` publishers are remembered (the
    longest silent forgotten), so memory stays bounded whatever ids arrive.
    """

    def __init__(self, clear_on_start: bool = True, max_publishers: int = 1024) -> None:
        self.clear_on_start = clear_on_start
        self.max_publishers = max(1, max_publishers)
        self.publishers: dict[int, int] = {}  # publisher id → last sequence (least recently seen first)
        self.owner: dict[int, int] = {}  # dp rank → the publisher that feeds it

    def on_message(self, publisher_id: int, sequence: int, ranks: set[int] | list[int]) -> tuple[bool, list[tuple[int, str]]]:
        """(apply the message?, the (rank, cause) clears to publish before its events)."""
        last = self.publishers.pop(publisher_id, None)
        if last is not None and sequence <= last:
            self.publishers[publisher_id] = last
            return False, []
        clears: list[tuple[int, str]] = []
        if last is not None and sequence > last + 1:
            clears = [(r, "unrecoverable_gap") for r, p in sorted(self.owner.items()) if p == publisher_id]
        self.publishers[publisher_id] = sequence
        if len(self.publishers) > self.max_publishers:
            del self.publishers[next(iter(self.publishers))]
        cleared = {r for r, _ in clears}
        for r in sorted(ranks):
            before = self.owner.get(r)
            if before == publisher_id:
                continue
            self.owner[r] = publisher_id
            if r in cleared:
                continue
            if before is not None:
                clears.append((r, "engine_restart"))
            elif self.clear_on_start:
                clears.append((r, "start"))
        return True, clears
