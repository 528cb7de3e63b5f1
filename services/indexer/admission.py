"""Which KV messages reach the index: subject binding, unknown workers, per-worker caps. Pure and
deterministic (no I/O, no clock): the adapter (`app.py`) feeds it stream messages and discovery
changes and carries out what it answers (apply, hold, re-read part of the stream).

**Subject binding.** A message on `{prefix}.{pool}.kv.{worker}.{dp}` may only carry events of that
worker and dp rank (one worker and rank per message); the subject must spell both in canonical
decimal. Anything else is refused whole and counted, never applied.

**Unknown workers.** A worker is *registered* in a pool once its discovery record was put (and not
deleted since). Messages of a worker that is neither registered nor removed are not indexed: they
wait, as raw bytes, in a per-pool buffer bounded in bytes; when the record appears they are applied
in stream order, before any later message of that worker. When the buffer is full the oldest held
messages are dropped (counted) and their worker is marked *spilled*.

The rule that keeps every replica identical, however the two streams interleave on each of them:

    Every message of a registered worker is applied, in stream order per (worker, dp rank) —
    including the ones it published before its record appeared.

A replica that replays the stream later (or restarts from a snapshot) already knows the record when
it reaches those early messages and applies them directly; a replica that saw them first holds them
and applies them when the record arrives. Both end with the same index, because a worker's state in
the index depends only on its own events in their own order. The buffer is only the fast path: when
it spilled a worker's messages, the replica re-reads the stream from that worker's first unapplied
message instead (a *rewind*), applying only that worker's messages up to where it already was.
Per pool, the first such sequence of at most `max_tracked` unknown workers is remembered (and kept
in snapshots); beyond that the earliest forgotten one is kept as a *floor*, and a worker that
registers later is first looked up in the stream from the floor (a *probe*: its first message at or
after the floor) before deciding. Memory is bounded by the buffer, the tracked workers and one
floor per pool, whatever unregistered publishers send; the price of a flood is a re-read of the
stream when one of the flooding ids does register.

What is not covered: messages the stream no longer holds when the rewind runs (`max_age`,
`max_bytes`) are lost on every replica alike; a worker deleted and re-put under the same id keeps the
existing "removed workers" semantics (events between the delete and the new put are dropped, see
docs/indexer.md).

**Caps.** A registered worker may hold at most `ceil(total_kv_blocks × headroom)` device blocks and
`ceil(total_kv_blocks × lower_tier_factor)` blocks in each lower tier, per dp rank
(`default_blocks` per tier when its record has no `total_kv_blocks`). A stored event that would go
over is refused whole (`over_capacity`, counted).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from schemas.events import RouterEvent
from schemas.subjects import parse_id
from services.runtime.workers import Tombstones

from .index import DEVICE, TIERS

WORKER_ID_LIMIT = 1 << 53
DP_RANK_LIMIT = 65535


def parse_kv_subject(subject: str, prefix: str) -> tuple[str, int, int] | None:
    """(pool, worker_id, dp_rank) of `{prefix}.{pool}.kv.{worker}.{dp}`, or None when the subject is
    not exactly that with canonical decimal numbers in range."""
    head = prefix + "."
    if not subject.startswith(head):
        return None
    parts = subject[len(head) :].split(".")
    if len(parts) != 4 or parts[1] != "kv" or not parts[0]:
        return None
    worker = parse_id(parts[2], WORKER_ID_LIMIT - 1)
    dp = parse_id(parts[3], DP_RANK_LIMIT)
    if worker is None or dp is None:
        return None
    return parts[0], worker, dp


def binding_error(events: Sequence[RouterEvent], worker_id: int, dp_rank: int) -> str | None:
    """Why a decoded message does not belong on the subject of (worker_id, dp_rank), or None."""
    for i, ev in enumerate(events):
        if ev.worker_id != worker_id or ev.event.dp_rank != dp_rank:
            return (
                f"event {i} is for worker {ev.worker_id} dp rank {ev.event.dp_rank}, the subject for worker {worker_id} dp rank {dp_rank}"
            )
    return None


@dataclass(frozen=True)
class CapPolicy:
    headroom: float = 1.25
    lower_tier_factor: float = 8.0
    default_blocks: int = 1 << 20

    def caps(self, total_kv_blocks: int | None) -> dict[str, int]:
        """Per-tier block caps of one (worker, dp rank), from its discovery record."""
        out: dict[str, int] = dict.fromkeys(TIERS, self.default_blocks)
        if not total_kv_blocks:
            return out
        lower = max(1, math.ceil(total_kv_blocks * self.lower_tier_factor))
        out = dict.fromkeys(TIERS, lower)
        out[DEVICE] = max(1, math.ceil(total_kv_blocks * self.headroom))
        return out


class Verdict(Enum):
    APPLY = "apply"
    HOLD = "hold"
    REMOVED = "removed_worker"  # discovery deleted the worker: ignored until it is put again
    SKIP = "skip"  # already processed (covered by the snapshot, or re-read by a rewind for another worker)


@dataclass(frozen=True)
class Held:
    seq: int
    worker_id: int
    dp_rank: int
    data: bytes
    content_type: str | None
    epoch: int = 0  # the publisher run its Nats-Msg-Id names

    @property
    def size(self) -> int:
        return len(self.data) + 64  # the bytes plus the bookkeeping of one entry


@dataclass
class Admit:
    """What to do when a worker's record appears: apply `apply` now (its held messages, in stream
    order), or re-read the stream from `rewind_from`, or first look up the worker's first message
    at or after `probe_from` and hand it to `Admission.probe_result`."""

    apply: list[Held] = field(default_factory=list)
    rewind_from: int | None = None
    probe_from: int | None = None


@dataclass
class PoolAdmission:
    covered: int = 0  # messages up to here are in the restored snapshot
    registered: dict[int, dict[str, int]] = field(default_factory=dict)  # worker → per-tier caps
    removed: Tombstones = field(default_factory=Tombstones)
    held: OrderedDict[int, Held] = field(default_factory=OrderedDict)  # seq → message
    held_bytes: int = 0
    first_seq: dict[int, int] = field(default_factory=dict)  # unknown worker → first seq not applied
    spilled: set[int] = field(default_factory=set)
    probing: set[int] = field(default_factory=set)
    floor: int | None = None
    replaying: dict[int, int] = field(default_factory=dict)  # worker → next seq to apply in the re-read zone
    counts: dict[str, int] = field(default_factory=dict)

    def count(self, what: str, n: int = 1) -> None:
        self.counts[what] = self.counts.get(what, 0) + n


class Admission:
    def __init__(self, pools: Sequence[str], *, buffer_bytes: int = 8 << 20, max_tracked: int = 16_384,
                 caps: CapPolicy | None = None) -> None:
        self.pools: dict[str, PoolAdmission] = {p: PoolAdmission() for p in pools}
        self.buffer_bytes = buffer_bytes
        self.max_tracked = max(1, max_tracked)
        self.cap_policy = caps or CapPolicy()
        self.replay_until = 0  # messages up to here were processed before the latest rewind
        self._pending_caps: dict[tuple[str, int], dict[str, int]] = {}  # caps of workers being probed

    # ---- stream messages ----------------------------------------------------------------------

    def route(self, pool: str, seq: int, worker_id: int) -> Verdict:
        st = self.pools[pool]
        zone = max(st.covered, self.replay_until)
        if seq <= zone:
            nxt = st.replaying.get(worker_id)
            if nxt is None or seq < nxt:
                return Verdict.SKIP
            st.replaying[worker_id] = seq + 1
            return Verdict.APPLY
        if st.replaying:
            st.replaying.clear()  # past the re-read zone of this pool
        if worker_id in st.removed:
            return Verdict.REMOVED
        if worker_id in st.registered:
            return Verdict.APPLY
        return Verdict.HOLD

    def hold(self, pool: str, msg: Held) -> list[Held]:
        """Keep a message of an unknown worker; returns what had to be dropped to stay in budget."""
        st = self.pools[pool]
        w = msg.worker_id
        evicted: list[Held] = []
        if w not in st.first_seq:
            if len(st.first_seq) >= self.max_tracked:
                evicted.extend(self._forget_oldest(st))
            st.first_seq[w] = msg.seq
        if msg.size > self.buffer_bytes:
            st.spilled.add(w)
            st.count("evicted")
            return [*evicted, msg]
        st.held[msg.seq] = msg
        st.held_bytes += msg.size
        st.count("held")
        while st.held_bytes > self.buffer_bytes:
            _, old = st.held.popitem(last=False)
            st.held_bytes -= old.size
            st.spilled.add(old.worker_id)
            st.count("evicted")
            evicted.append(old)
        return evicted

    def _forget_oldest(self, st: PoolAdmission) -> list[Held]:
        """Too many unknown workers to track: forget the one waiting longest; the floor keeps the
        earliest sequence any forgotten worker may need."""
        worker, first = min(st.first_seq.items(), key=lambda kv: kv[1])
        del st.first_seq[worker]
        st.spilled.discard(worker)
        st.floor = first if st.floor is None else min(st.floor, first)
        st.count("forgotten_workers")
        return self._drop_held(st, worker)

    def _drop_held(self, st: PoolAdmission, worker_id: int) -> list[Held]:
        mine = [m for m in st.held.values() if m.worker_id == worker_id]
        for m in mine:
            del st.held[m.seq]
            st.held_bytes -= m.size
        return mine

    # ---- discovery ----------------------------------------------------------------------------

    def put(self, pool: str, worker_id: int, total_kv_blocks: int | None) -> Admit:
        st = self.pools.get(pool)
        if st is None:
            return Admit()
        caps = self.cap_policy.caps(total_kv_blocks)
        if worker_id in st.probing:
            self._pending_caps[(pool, worker_id)] = caps  # an update while its probe is out
            return Admit()
        if worker_id in st.registered:
            st.registered[worker_id] = caps  # heartbeat or update
            return Admit()
        if st.removed.put(worker_id):
            # Put again after a delete: its events count from now on; those published while it was
            # removed were dropped (docs/indexer.md, worker removal).
            st.registered[worker_id] = caps
            return Admit()
        if st.floor is not None:
            # Its early messages may be among those of forgotten workers: ask the stream first.
            st.probing.add(worker_id)
            self._pending_caps[(pool, worker_id)] = caps
            st.count("probes")
            return Admit(probe_from=st.floor)
        st.registered[worker_id] = caps
        return self._admit(st, worker_id, None)

    def probe_result(self, pool: str, worker_id: int, found_seq: int | None) -> Admit:
        """`found_seq`: the worker's first message at or after the pool's floor (None: none)."""
        st = self.pools[pool]
        if worker_id not in st.probing:
            return Admit()  # removed meanwhile
        st.probing.discard(worker_id)
        st.registered[worker_id] = self._pending_caps.pop((pool, worker_id), self.cap_policy.caps(None))
        return self._admit(st, worker_id, found_seq)

    def _admit(self, st: PoolAdmission, worker_id: int, found_seq: int | None) -> Admit:
        marker = st.first_seq.pop(worker_id, None)
        spilled = worker_id in st.spilled
        st.spilled.discard(worker_id)
        held = self._drop_held(st, worker_id)
        earlier = found_seq is not None and (marker is None or found_seq < marker)
        if earlier:
            st.count("rewinds")
            return Admit(rewind_from=found_seq)
        if spilled:
            st.count("rewinds")
            return Admit(rewind_from=marker)
        held.sort(key=lambda m: m.seq)
        st.count("released", len(held))
        return Admit(apply=held)

    def remove(self, pool: str, worker_id: int) -> list[Held]:
        """Discovery deleted the worker: registered or not, its messages are ignored until a new put."""
        st = self.pools.get(pool)
        if st is None:
            return []
        st.registered.pop(worker_id, None)
        st.probing.discard(worker_id)
        self._pending_caps.pop((pool, worker_id), None)
        st.removed.remove(worker_id)
        st.first_seq.pop(worker_id, None)
        st.spilled.discard(worker_id)
        st.replaying.pop(worker_id, None)
        dropped = self._drop_held(st, worker_id)
        st.count("discarded", len(dropped))
        return dropped

    def begin_replay(self, pool: str, worker_id: int, from_seq: int, position: int) -> None:
        """The adapter re-reads the stream from `from_seq` for this worker; everything up to
        `position` was processed already and is skipped for every other worker."""
        st = self.pools[pool]
        self.replay_until = max(self.replay_until, position)
        current = st.replaying.get(worker_id)
        st.replaying[worker_id] = from_seq if current is None else min(current, from_seq)

    # ---- caps ---------------------------------------------------------------------------------

    def cap(self, pool: str, worker_id: int, tier: str) -> int | None:
        caps = self.pools[pool].registered.get(worker_id)
        return caps.get(tier) if caps is not None else None

    # ---- snapshots ----------------------------------------------------------------------------

    def to_state(self, pool: str) -> dict[str, Any]:
        """What a snapshot must carry: the admitted workers (so a restart does not re-read them),
        the first unapplied sequence of every tracked unknown worker, and the floor. Held bytes are
        not carried: after a restore every tracked worker counts as spilled (re-read on admission)."""
        st = self.pools[pool]
        return {
            "admitted": sorted(st.registered),  # a worker being probed is not admitted yet
            "unknown": sorted([w, s] for w, s in st.first_seq.items()),
            "floor": st.floor,
        }

    def restore(self, pool: str, state: dict[str, Any] | None, covered: int) -> None:
        st = self.pools[pool] = PoolAdmission(covered=covered)
        if not state:
            return
        for w in state.get("admitted", []):
            st.registered[int(w)] = self.cap_policy.caps(None)  # the record's put refines the caps
        for w, s in state.get("unknown", []):
            st.first_seq[int(w)] = int(s)
            st.spilled.add(int(w))
        floor = state.get("floor")
        st.floor = int(floor) if floor is not None else None
