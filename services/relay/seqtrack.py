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
