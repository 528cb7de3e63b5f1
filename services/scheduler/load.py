"""In-flight load per (worker, dp_rank), folded from booking events (docs/protocol.md §4, Dynamo §4.5).

Pure and deterministic: time is passed in, and every rule that involves time compares *event*
timestamps (`ts_ms`), never the moment a replica applied the event. Every replica that applies the
same events in stream order therefore holds the same view at the same instant, whether it applied
them live, late, or replayed them at start.

A *booking* is one select's attempt to book a request, named by its `booking_id`, with one leg
(aggregated or decode) or two (`prefill` + decode). Legs are keyed `(request_id, booking_id, leg)`,
so a request id booked again after its free is a new booking. Events without a booking id (older
publishers) address every booking of the request id.

- `add` registers a leg; a known key is a no-op (a duplicate). An add of a booking that an earlier
  `free` cancelled (see below) is a no-op. Its prefill contribution is `max(isl − overlap ×
  block_size, 0)` tokens (Dynamo's classic `new_tokens`) when `track_prefill_tokens`, else 0. Its
  sequence hashes are reference-counted per (worker, dp_rank), so a prefix shared by concurrent
  requests counts once in `active_blocks`.
- Expiry: a leg *unconfirmed* by a `prefill_complete` lives until `ts + unconfirmed_ttl` (its
  deadline), a confirmed one until `ts + ttl`. An unconfirmed leg past its deadline is *dormant*:
  it no longer counts, but is kept until `ts + ttl`, because a `prefill_complete` stamped before the
  deadline may still arrive (published in time by another replica, or replayed by a restarting
  one) and then revives it, on every replica alike.
- `prefill_complete` applies to the legs alive at its `ts` (an unconfirmed leg only before its
  deadline): it confirms them, releases the prefill leg completely (the prefill worker is done)
  and removes the decode leg's prefill tokens; the decode leg keeps its blocks. Repeats are no-ops.
- `free` releases every matching leg, live or dormant. A free naming a booking that matches nothing
  records a *cancel*: an add of that booking later in the stream, stamped less than `ttl` after the
  free, is a no-op. This is how a select that books after its caller gave up books nothing.
- `move` carries the decode leg (with its tokens, blocks and expiry) to another (worker, dp_rank):
  the gateway served the request from a fallback endpoint. Dormant legs move too (a revival then
  lands on the new target, as on a replica that had not swept them yet). Unknown ids, a missing
  decode leg and a move to where the leg already is are no-ops.
- *Provisional* legs (a replica's own add, applied before the stream delivers it, see
  `state.BookingState`) count in the view but are invisible to `prefill_complete` / `free`, which
  only ever see the stream's copies. A provisional add already past its window is not applied.
"""

from __future__ import annotations

import hashlib
import heapq
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from schemas.bookings import BookingAdd

Target = tuple[int, int]  # (worker_id, dp_rank)
LegKey = tuple[str, str, str]  # (request_id, booking_id, leg)
PREFILL_LEG = "prefill"


@dataclass
class Leg:
    request_id: str
    leg: str
    target: Target
    hashes: tuple[int, ...]
    prefill_tokens: int
    expires_ms: int  # ts + ttl: the end of a confirmed leg
    isl_tokens: int
    overlap_blocks: int
    booking_id: str = ""
    deadline_ms: int = 0  # ts + unconfirmed ttl: the end of an unconfirmed leg
    confirmed: bool = True
    provisional: bool = False
    serial: int = 0  # tells this leg's expiry-heap entries from those of an earlier leg of the same key

    @property
    def key(self) -> LegKey:
        return (self.request_id, self.booking_id, self.leg)

    @property
    def ends_ms(self) -> int:
        return self.expires_ms if self.confirmed else self.deadline_ms


@dataclass
class RankLoad:
    prefill_tokens: int = 0
    requests: int = 0
    block_refs: dict[int, int] = field(default_factory=dict)

    @property
    def active_blocks(self) -> int:
        return len(self.block_refs)


class LoadView(NamedTuple):
    active_prefill_tokens: int
    active_blocks: int
    active_requests: int


EMPTY = LoadView(0, 0, 0)


class LoadTracker:
    def __init__(self, ttl_ms: int = 300_000, unconfirmed_ttl_ms: int = 0, max_cancels: int = 100_000) -> None:
        self.ttl_ms = ttl_ms
        # 0 (or ≥ ttl) = no separate window: a leg lives ttl whether confirmed or not.
        self.unconfirmed_ttl_ms = unconfirmed_ttl_ms if 0 < unconfirmed_ttl_ms < ttl_ms else ttl_ms
        self.max_cancels = max(1, max_cancels)
        self.legs: dict[LegKey, Leg] = {}  # live legs: they make the view
        self.by_request: dict[str, dict[LegKey, None]] = {}  # live legs per request id, in add order
        self.dormant: dict[LegKey, Leg] = {}
        self.dormant_by_request: dict[str, dict[LegKey, None]] = {}
        self.cancels: OrderedDict[tuple[str, str], int] = OrderedDict()  # (request_id, booking_id) → free ts
        self.ranks: dict[Target, RankLoad] = {}
        self._expiry: list[tuple[int, int, LegKey]] = []  # (when, serial, key)
        self._serial = 0
        self.duplicates = 0
        self.unknown = 0
        self.cancelled = 0

    # --- events ------------------------------------------------------------------------------

    def add(self, ev: BookingAdd, now_ms: int, provisional: bool = False) -> bool:
        key = (ev.request_id, ev.booking_id, ev.leg)
        if key in self.legs or key in self.dormant:
            self.duplicates += 1
            return False
        ts = ev.ts_ms or now_ms
        cancel = self.cancels.get((ev.request_id, ev.booking_id)) if ev.booking_id else None
        if cancel is not None and ts < cancel + self.ttl_ms:
            self.cancelled += 1
            return False
        expires, deadline = ts + self.ttl_ms, ts + self.unconfirmed_ttl_ms
        if expires <= now_ms:
            return False  # already stale (replayed from an old stream tail)
        if provisional and min(expires, deadline) <= now_ms:
            return False  # nothing to count until the stream's copy decides (it may turn dormant)
        prefill = max(ev.isl_tokens - ev.overlap_blocks * ev.block_size, 0) if ev.track_prefill_tokens else 0
        # Dedup within the request too: a hash listed twice occupies one block.
        hashes = tuple(dict.fromkeys(ev.sequence_hashes))
        self._serial += 1
        leg = Leg(
            ev.request_id, ev.leg, (ev.worker_id, ev.dp_rank), hashes, prefill, expires, ev.isl_tokens, ev.overlap_blocks,
            booking_id=ev.booking_id, deadline_ms=deadline, confirmed=deadline >= expires, provisional=provisional,
            serial=self._serial,
        )
        if deadline < expires:
            heapq.heappush(self._expiry, (deadline, leg.serial, key))
        heapq.heappush(self._expiry, (expires, leg.serial, key))
        if leg.ends_ms <= now_ms:
            self._put_dormant(leg)  # replayed after its deadline: a prefill_complete may still follow
        else:
            self._put_live(leg)
        return True

    def prefill_complete(self, request_id: str, booking_id: str = "", ts_ms: int = 0, now_ms: int = 0) -> bool:
        ts = ts_ms or now_ms
        applied = False
        for leg in self._matching(request_id, booking_id):
            if not leg.confirmed:
                if ts >= leg.deadline_ms:
                    continue  # it had expired by then
                leg.confirmed = True
                if leg.key in self.dormant:
                    self._drop_dormant(leg)
                    if leg.expires_ms <= now_ms:
                        continue
                    self._put_live(leg)
            applied = True
            if leg.leg == PREFILL_LEG:
                self._release(leg)
            elif leg.prefill_tokens:
                self.ranks[leg.target].prefill_tokens -= leg.prefill_tokens
                leg.prefill_tokens = 0
        if not applied:
            self.unknown += 1
        return applied

    def free(self, request_id: str, booking_id: str = "", ts_ms: int = 0, now_ms: int = 0) -> bool:
        found = False
        for leg in self._matching(request_id, booking_id):
            found = True
            if leg.key in self.legs:
                self._release(leg)
            else:
                self._drop_dormant(leg)
        if not found:
            self.unknown += 1
            if booking_id:
                self.cancels[(request_id, booking_id)] = ts_ms or now_ms
                while len(self.cancels) > self.max_cancels:
                    self.cancels.popitem(last=False)
        return found

    def move(self, request_id: str, target: Target, leg: str = "", booking_id: str = "") -> bool:
        moved = False
        for entry in self._matching(request_id, booking_id):
            if entry.leg != leg or entry.target == target:
                continue
            moved = True
            if entry.key in self.legs:
                self._unload(entry)
                entry.target = target
                self._load(entry)
            else:
                entry.target = target
        if not moved and not self._matching(request_id, booking_id):
            self.unknown += 1
        return moved

    def discard_leg(self, request_id: str, leg: str, booking_id: str = "") -> bool:
        """Remove one live leg as if it had never been added (no counters): used to replace a replica's
        provisional copy of its own booking by the copy the bookings stream delivers."""
        entry = self.legs.get((request_id, booking_id, leg))
        if entry is None:
            return False
        self._release(entry)
        return True

    def expire(self, now_ms: int) -> list[str]:
        """Legs past their end stop counting (unconfirmed ones turn dormant until `ts + ttl`);
        returns the request ids whose load was released."""
        out: list[str] = []
        heap = self._expiry
        while heap and heap[0][0] <= now_ms:
            _, serial, key = heapq.heappop(heap)
            leg = self.legs.get(key)
            if leg is not None and leg.serial == serial:
                if leg.ends_ms <= now_ms:
                    self._release(leg)
                    out.append(leg.request_id)
                    if leg.expires_ms > now_ms and not leg.provisional:
                        self._put_dormant(leg)
                continue
            leg = self.dormant.get(key)
            if leg is not None and leg.serial == serial and leg.expires_ms <= now_ms:
                self._drop_dormant(leg)
        # A cancel matters only for adds stamped before `free ts + ttl`, and such an add is stale
        # once `ts + ttl` has passed: after `free ts + 2·ttl` nothing it could stop can arrive.
        cancels = self.cancels
        while cancels and next(iter(cancels.values())) + 2 * self.ttl_ms <= now_ms:
            cancels.popitem(last=False)
        return out

    def drop_worker(self, worker_id: int) -> list[str]:
        """A worker left: release every leg on any of its ranks."""
        victims = [leg for leg in self.legs.values() if leg.target[0] == worker_id]
        for leg in victims:
            self._release(leg)
        for leg in [leg for leg in self.dormant.values() if leg.target[0] == worker_id]:
            self._drop_dormant(leg)
        return [leg.request_id for leg in victims]

    # --- internals ---------------------------------------------------------------------------

    def _matching(self, request_id: str, booking_id: str) -> list[Leg]:
        """The stream's legs (live or dormant) of a request, or of one of its bookings."""
        keys = [*self.by_request.get(request_id, ()), *self.dormant_by_request.get(request_id, ())]
        legs = [self.legs.get(k) or self.dormant[k] for k in keys if not booking_id or k[1] == booking_id]
        return [leg for leg in legs if not leg.provisional]

    def _put_live(self, leg: Leg) -> None:
        self.legs[leg.key] = leg
        self.by_request.setdefault(leg.request_id, {})[leg.key] = None
        self._load(leg)

    def _load(self, leg: Leg) -> None:
        rank = self.ranks.setdefault(leg.target, RankLoad())
        rank.prefill_tokens += leg.prefill_tokens
        rank.requests += 1
        refs = rank.block_refs
        for h in leg.hashes:
            refs[h] = refs.get(h, 0) + 1

    def _release(self, leg: Leg) -> None:
        del self.legs[leg.key]
        names = self.by_request[leg.request_id]
        del names[leg.key]
        if not names:
            del self.by_request[leg.request_id]
        self._unload(leg)

    def _unload(self, leg: Leg) -> None:
        rank = self.ranks[leg.target]
        rank.prefill_tokens -= leg.prefill_tokens
        rank.requests -= 1
        refs = rank.block_refs
        for h in leg.hashes:
            n = refs[h] - 1
            if n:
                refs[h] = n
            else:
                del refs[h]
        if rank.requests == 0:
            del self.ranks[leg.target]

    def _put_dormant(self, leg: Leg) -> None:
        self.dormant[leg.key] = leg
        self.dormant_by_request.setdefault(leg.request_id, {})[leg.key] = None

    def _drop_dormant(self, leg: Leg) -> None:
        del self.dormant[leg.key]
        keys = self.dormant_by_request[leg.request_id]
        del keys[leg.key]
        if not keys:
            del self.dormant_by_request[leg.request_id]

    # --- queries -----------------------------------------------------------------------------

    def is_active(self, request_id: str) -> bool:
        return request_id in self.by_request

    def legs_of(self, request_id: str) -> list[Leg]:
        """Live legs of a request id, in add order (several bookings: the oldest first)."""
        return [self.legs[key] for key in self.by_request.get(request_id, ())]

    def bookings_of(self, request_id: str, provisional: bool = True) -> list[str]:
        """Booking ids of a request's live legs, oldest first (without provisional ones if asked)."""
        return list(dict.fromkeys(leg.booking_id for leg in self.legs_of(request_id) if provisional or not leg.provisional))

    def view(self, target: Target) -> LoadView:
        rank = self.ranks.get(target)
        if rank is None:
            return EMPTY
        return LoadView(rank.prefill_tokens, rank.active_blocks, rank.requests)

    def new_blocks(self, target: Target, hashes: Iterable[int]) -> int:
        """How many of `hashes` are not yet active on `target` (the request's added decode blocks)."""
        hs = hashes if isinstance(hashes, (set, frozenset)) else set(hashes)
        rank = self.ranks.get(target)
        if rank is None:
            return len(hs)
        return len(hs.difference(rank.block_refs))

    def leading_active(self, target: Target, hashes: Sequence[int]) -> int:
        """How many leading `hashes` are active on `target`: a prefix that requests booked there will
        have computed before a request queued behind them is prefilled (the kvr rule's in-flight
        overlap, services/scheduler/cost.py)."""
        rank = self.ranks.get(target)
        if rank is None:
            return 0
        refs = rank.block_refs
        n = 0
        for h in hashes:
            if h not in refs:
                break
            n += 1
        return n

    def targets(self) -> list[Target]:
        return sorted(self.ranks)

    def request_ids(self) -> list[str]:
        return sorted(self.by_request)

    def digest(self, workers: set[int] | None = None) -> str:
        """Order-independent fingerprint of the whole view (legs, tokens, blocks), for replica checks."""
        h = hashlib.sha256()
        for key in sorted(self.legs):
            leg = self.legs[key]
            if workers is not None and leg.target[0] not in workers:
                continue
            h.update(repr((key, leg.target, leg.prefill_tokens, leg.ends_ms, leg.confirmed, leg.hashes)).encode())
        return h.hexdigest()[:32]
