"""In-flight load per (worker, dp_rank), folded from booking events (docs/protocol.md §4, Dynamo §4.5).

Pure and deterministic: time is passed in, and a booking's expiry is derived from the event's own
`ts_ms`, so every replica that applies the same events holds the same view at the same instant.

Semantics:
- `add` registers one *leg* of a request (key = (request_id, leg)); a duplicate key is a no-op.
  Its prefill contribution is `max(isl − overlap × block_size, 0)` tokens (Dynamo's classic
  `new_tokens`) when `track_prefill_tokens`, else 0. Its sequence hashes are reference-counted per
  (worker, dp_rank), so a prefix shared by concurrent requests counts once in `active_blocks`.
- `prefill_complete` removes the prefill tokens of every leg of the request and releases the
  `prefill` leg completely (the prefill worker is done with it); the decode leg keeps its blocks.
- `free` releases every leg. Unknown ids and repeats are no-ops.
- `move` carries the decode leg (with its tokens, blocks and expiry) to another (worker, dp_rank):
  the gateway served the request from a fallback endpoint. Unknown ids, a missing decode leg and a
  move to where the leg already is are no-ops.
- Expiry: a leg expires at `ts_ms + ttl`; `expire(now)` drops legs past it.
"""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

from schemas.bookings import BookingAdd

Target = tuple[int, int]  # (worker_id, dp_rank)
PREFILL_LEG = "prefill"


@dataclass
class Leg:
    request_id: str
    leg: str
    target: Target
    hashes: tuple[int, ...]
    prefill_tokens: int
    expires_ms: int
    isl_tokens: int
    overlap_blocks: int


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
    def __init__(self, ttl_ms: int = 300_000) -> None:
        self.ttl_ms = ttl_ms
        self.legs: dict[tuple[str, str], Leg] = {}
        self.by_request: dict[str, list[str]] = {}
        self.ranks: dict[Target, RankLoad] = {}
        self._expiry: list[tuple[int, str, str]] = []
        self.duplicates = 0
        self.unknown = 0

    # --- events ------------------------------------------------------------------------------

    def add(self, ev: BookingAdd, now_ms: int) -> bool:
        key = (ev.request_id, ev.leg)
        if key in self.legs:
            self.duplicates += 1
            return False
        ts = ev.ts_ms or now_ms
        expires = ts + self.ttl_ms
        if expires <= now_ms:
            return False  # already stale (replayed from an old stream tail)
        prefill = max(ev.isl_tokens - ev.overlap_blocks * ev.block_size, 0) if ev.track_prefill_tokens else 0
        target = (ev.worker_id, ev.dp_rank)
        # Dedup within the request too: a hash listed twice occupies one block.
        hashes = tuple(dict.fromkeys(ev.sequence_hashes))
        leg = Leg(ev.request_id, ev.leg, target, hashes, prefill, expires, ev.isl_tokens, ev.overlap_blocks)
        self.legs[key] = leg
        self.by_request.setdefault(ev.request_id, []).append(ev.leg)
        self._load(leg)
        heapq.heappush(self._expiry, (expires, ev.request_id, ev.leg))
        return True

    def prefill_complete(self, request_id: str) -> bool:
        legs = self.by_request.get(request_id)
        if not legs:
            self.unknown += 1
            return False
        for leg_name in list(legs):
            leg = self.legs[(request_id, leg_name)]
            if leg_name == PREFILL_LEG:
                self._release(leg)
            elif leg.prefill_tokens:
                self.ranks[leg.target].prefill_tokens -= leg.prefill_tokens
                leg.prefill_tokens = 0
        return True

    def free(self, request_id: str) -> bool:
        legs = self.by_request.get(request_id)
        if not legs:
            self.unknown += 1
            return False
        for leg_name in list(legs):
            self._release(self.legs[(request_id, leg_name)])
        return True

    def move(self, request_id: str, target: Target, leg: str = "") -> bool:
        entry = self.legs.get((request_id, leg))
        if entry is None:
            self.unknown += 1
            return False
        if entry.target == target:
            return False
        self._unload(entry)
        entry.target = target
        self._load(entry)
        return True

    def discard_leg(self, request_id: str, leg: str) -> bool:
        """Remove one leg as if it had never been added (no counters): used to replace a replica's
        provisional copy of its own booking by the copy the bookings stream delivers."""
        entry = self.legs.get((request_id, leg))
        if entry is None:
            return False
        self._release(entry)
        return True

    def expire(self, now_ms: int) -> list[str]:
        """Drop legs whose TTL has passed; returns the request ids touched."""
        out: list[str] = []
        heap = self._expiry
        while heap and heap[0][0] <= now_ms:
            expires, rid, leg_name = heapq.heappop(heap)
            leg = self.legs.get((rid, leg_name))
            if leg is not None and leg.expires_ms == expires:
                self._release(leg)
                out.append(rid)
        return out

    def drop_worker(self, worker_id: int) -> list[str]:
        """A worker left: release every leg on any of its ranks."""
        victims = [leg for leg in self.legs.values() if leg.target[0] == worker_id]
        for leg in victims:
            self._release(leg)
        return [leg.request_id for leg in victims]

    def _load(self, leg: Leg) -> None:
        rank = self.ranks.setdefault(leg.target, RankLoad())
        rank.prefill_tokens += leg.prefill_tokens
        rank.requests += 1
        refs = rank.block_refs
        for h in leg.hashes:
            refs[h] = refs.get(h, 0) + 1

    def _release(self, leg: Leg) -> None:
        del self.legs[(leg.request_id, leg.leg)]
        names = self.by_request[leg.request_id]
        names.remove(leg.leg)
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

    # --- queries -----------------------------------------------------------------------------

    def is_active(self, request_id: str) -> bool:
        return request_id in self.by_request

    def legs_of(self, request_id: str) -> list[Leg]:
        return [self.legs[(request_id, name)] for name in self.by_request.get(request_id, ())]

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
            h.update(repr((key, leg.target, leg.prefill_tokens, leg.expires_ms, leg.hashes)).encode())
        return h.hexdigest()[:32]
