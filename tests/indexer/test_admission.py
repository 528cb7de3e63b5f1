"""Admission (pure): subject binding, unknown workers, caps — and the property that matters: every
replica reaches the same index from the same streams, whatever the interleaving of discovery and KV
messages it saw, its buffer size, and where it was restarted from a snapshot."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas import codec
from schemas.discovery import WorkerRecord
from schemas.events import RouterEvent, cleared_event, stored_event
from services.indexer.admission import Admission, CapPolicy, Held, Verdict, binding_error, parse_kv_subject
from services.indexer.core import Carry, IndexCore
from services.indexer.index import PrefixIndex
from services.indexer.snapshot import LoadedSnapshot

from .workload import Workload

# ---- subject binding -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("subject", "expected"),
    [
        ("kvr.p.kv.7.0", ("p", 7, 0)),
        ("kvr.pool-a.kv.9007199254740991.65535", ("pool-a", 2**53 - 1, 65535)),
        ("kvr.p.kv.07.0", None),  # not canonical: another spelling of worker 7
        ("kvr.p.kv.+7.0", None),
        ("kvr.p.kv.٧.0", None),  # a non-ASCII digit
        ("kvr.p.kv.9007199254740992.0", None),  # beyond the worker id range
        ("kvr.p.kv.7.65536", None),
        ("kvr.p.kv.7", None),
        ("kvr.p.kv.7.0.x", None),
        ("kvr.p.bookings.7.0", None),
        ("other.p.kv.7.0", None),
        ("kvr..kv.7.0", None),
    ],
)
def test_kv_subjects_must_name_one_worker_and_rank_canonically(subject: str, expected: object) -> None:
    assert parse_kv_subject(subject, "kvr") == expected


def test_a_prefix_with_dots() -> None:
    assert parse_kv_subject("acme.kvr.p.kv.1.2", "acme.kvr") == ("p", 1, 2)


def test_binding_refuses_any_event_of_another_worker_or_rank() -> None:
    assert binding_error([stored_event(7, 0, [(1, 1)]), cleared_event(7, 1)], 7, 0) is None
    assert "worker 8" in (binding_error([stored_event(7, 0, [(1, 1)]), cleared_event(8, 1)], 7, 0) or "")
    assert "dp rank 1" in (binding_error([cleared_event(7, 1, dp_rank=1)], 7, 0) or "")


# ---- caps -----------------------------------------------------------------------------------


def test_caps_from_the_record() -> None:
    policy = CapPolicy(headroom=1.25, lower_tier_factor=8.0, default_blocks=100)
    assert policy.caps(1000) == {"device": 1250, "host_pinned": 8000, "disk": 8000, "external": 8000}
    assert policy.caps(None) == {"device": 100, "host_pinned": 100, "disk": 100, "external": 100}
    assert policy.caps(0) == policy.caps(None)


def test_a_store_over_the_cap_is_refused_whole_and_moves_do_not_count() -> None:
    index = PrefixIndex()
    assert index.apply(stored_event(1, 0, [(1, 11), (2, 12), (3, 13)]), cap=4) == "ok"
    assert index.apply(stored_event(1, 1, [(4, 14), (5, 15)], parent_hash=3), cap=4) == "over_capacity"
    assert index.tree_sizes() == {(1, 0): 3}
    # storing hashes the worker already holds (a move) adds nothing
    assert index.apply(stored_event(1, 2, [(1, 11), (2, 12), (3, 13), (4, 14)]), cap=4) == "ok"
    assert index.tree_sizes() == {(1, 0): 4}
    assert index.counters[("stored", "over_capacity")] == 1
    assert index.apply(stored_event(1, 3, [(6, 16)], storage_tier="host_pinned"), cap=1) == "ok"  # per tier


# ---- the buffer -----------------------------------------------------------------------------


def held(seq: int, worker: int, size: int = 100) -> Held:
    return Held(seq, worker, 0, b"x" * size, None)


def test_unknown_workers_are_held_and_released_in_order_when_their_record_appears() -> None:
    adm = Admission(["p"], buffer_bytes=10_000)
    assert adm.route("p", 1, 5) is Verdict.HOLD
    adm.hold("p", held(1, 5))
    adm.hold("p", held(2, 6))
    adm.hold("p", held(3, 5))
    admit = adm.put("p", 5, 1000)
    assert [m.seq for m in admit.apply] == [1, 3] and admit.rewind_from is None
    assert adm.route("p", 4, 5) is Verdict.APPLY
    assert adm.route("p", 5, 6) is Verdict.HOLD
    assert adm.cap("p", 5, "device") == 1250
    assert adm.pools["p"].held_bytes == held(2, 6).size


def test_a_full_buffer_spills_and_the_worker_is_then_read_again_from_the_stream() -> None:
    adm = Admission(["p"], buffer_bytes=3 * held(0, 0).size)
    for seq, worker in [(10, 1), (11, 2), (12, 1), (13, 3)]:
        adm.hold("p", held(seq, worker))
    st = adm.pools["p"]
    assert list(st.held) == [11, 12, 13] and st.spilled == {1}
    assert adm.put("p", 2, None).apply == [held(11, 2)]
    admit = adm.put("p", 1, None)
    assert admit.apply == [] and admit.rewind_from == 10  # its seq 10 was dropped: re-read from there
    adm.begin_replay("p", 1, 10, position=13)
    assert [adm.route("p", s, w) for s, w in [(10, 1), (11, 2), (12, 1), (13, 3), (14, 1)]] == [
        Verdict.APPLY, Verdict.SKIP, Verdict.APPLY, Verdict.SKIP, Verdict.APPLY,
    ]


def test_too_many_unknown_workers_leave_a_floor_and_later_registrations_probe_the_stream() -> None:
    adm = Admission(["p"], buffer_bytes=1 << 20, max_tracked=2)
    for seq, worker in [(1, 1), (2, 2), (3, 3)]:
        adm.hold("p", held(seq, worker))
    st = adm.pools["p"]
    assert st.floor == 1 and set(st.first_seq) == {2, 3} and 1 not in {m.worker_id for m in st.held.values()}
    admit = adm.put("p", 1, None)
    assert admit.probe_from == 1 and adm.route("p", 4, 1) is Verdict.HOLD  # held while the probe is out
    adm.hold("p", held(4, 1))
    assert adm.probe_result("p", 1, 1).rewind_from == 1
    admit = adm.put("p", 3, None)
    assert admit.probe_from == 1
    assert [m.seq for m in adm.probe_result("p", 3, 3).apply] == [3]  # nothing before what is held
    assert adm.probe_result("p", 9, None).apply == []  # not probing: nothing


def test_removed_workers_are_dropped_not_held_and_a_new_put_counts_from_then() -> None:
    adm = Admission(["p"])
    adm.put("p", 1, None)
    adm.hold("p", held(2, 2))
    assert adm.remove("p", 2) == [held(2, 2)]
    assert adm.route("p", 3, 2) is Verdict.REMOVED
    assert adm.put("p", 2, None).apply == [] and adm.route("p", 4, 2) is Verdict.APPLY
    adm.remove("p", 1)
    assert adm.route("p", 5, 1) is Verdict.REMOVED


def test_state_round_trip_marks_tracked_workers_spilled() -> None:
    adm = Admission(["p"], max_tracked=1)
    adm.put("p", 9, None)
    adm.hold("p", held(3, 1))
    adm.hold("p", held(4, 2))  # forgets worker 1: floor 3
    state = adm.to_state("p")
    assert state == {"admitted": [9], "unknown": [[2, 4]], "floor": 3}
    again = Admission(["p"])
    again.restore("p", state, covered=4)
    assert again.route("p", 4, 9) is Verdict.SKIP and again.route("p", 5, 9) is Verdict.APPLY
    assert again.put("p", 9, 10).apply == []  # admitted before the snapshot: nothing to re-read
    assert again.put("p", 2, None).probe_from == 3
    assert again.probe_result("p", 2, 4).rewind_from == 4  # held bytes are not in snapshots


# ---- determinism across replicas ---------------------------------------------------------------


@dataclass
class Replica:
    """The index replica's fold (`IndexCore`, pure) driven synchronously, its rewinds and probes
    carried out here as the adapter (`IndexReplica`) does over NATS."""

    buffer: int
    tracked: int
    core: IndexCore = field(init=False)
    cursor: int = 1
    probes: list[tuple[str, int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.core = IndexCore(["p"], Admission(["p"], buffer_bytes=self.buffer, max_tracked=self.tracked), prefix="kvr")

    def _carry(self, pool: str, worker: int, carry: Carry) -> None:
        if carry.rewind_from is not None:  # StreamFollower.rewind
            self.cursor = min(self.cursor, carry.rewind_from)
        if carry.probe_from is not None:
            self.probes.append((pool, worker, carry.probe_from))

    def kv(self, stream: list[tuple[int, bytes]]) -> bool:
        if self.cursor > len(stream):
            return False
        worker, data = stream[self.cursor - 1]
        self.core.on_kv(self.cursor, f"kvr.p.kv.{worker}.0", data, None)
        self.cursor += 1
        return True

    def discovery(self, op: tuple[str, int]) -> None:
        kind, worker = op
        if kind == "put":
            self._carry("p", worker, self.core.worker_put(WorkerRecord(worker_id=worker, pool="p", total_kv_blocks=10_000)))
        else:
            self.core.worker_removed("p", worker)

    def probe(self, stream: list[tuple[int, bytes]]) -> bool:
        if not self.probes:
            return False
        pool, worker, frm = self.probes.pop(0)
        found = next((s for s in range(max(1, frm), len(stream) + 1) if stream[s - 1][0] == worker), None)
        self._carry(pool, worker, self.core.probe_result(pool, worker, found))
        return True

    def snapshot(self) -> LoadedSnapshot | None:
        """What the snapshot loop would write now (None: it waits while a backfill runs)."""
        if self.cursor <= self.core.applied_seq or self.probes:  # re-reading, or a probe is out
            return None
        st = self.core.states["p"]
        seq = max(self.core.applied_seq, st.covered_seq)
        restored = PrefixIndex.from_snapshot(st.index.to_snapshot())
        return LoadedSnapshot(restored, seq, 0, 0.0, 1.0, self.core.admission.to_state("p"))

    def restart(self, snap: LoadedSnapshot | None, discovery_so_far: list[tuple[str, int]], stream: list[tuple[int, bytes]]) -> None:
        """Killed at any moment; restarts from the last snapshot written (or from scratch)."""
        self.__post_init__()
        self.probes.clear()
        self.cursor = 1
        if snap is not None:
            self.core.restore_pool("p", snap.index, snap.stream_seq, snap.admission)
            self.core.applied_seq = snap.stream_seq
            self.cursor = snap.stream_seq + 1
        # the bucket keeps the latest record per key: replay that before the stream (watcher first)
        latest: dict[int, str] = {}
        for kind, worker in discovery_so_far:
            latest[worker] = kind
        for worker, kind in sorted(latest.items()):
            self.discovery((kind, worker))
        while self.probe(stream):  # probes finish before the follower starts
            pass

    def dump(self) -> list[RouterEvent]:
        return self.core.states["p"].index.dump()


def build_streams(seed: int, workers: int, messages: int) -> tuple[list[tuple[int, bytes]], list[tuple[str, int]]]:
    wl = Workload(seed, workers=workers, dp_ranks=1)
    rng = random.Random(seed)
    stream = []
    for _ in range(messages):
        msg = wl.message()
        stream.append((msg[0].worker_id, codec.encode_json(msg)))
    # discovery: most workers register at some point, a few never (their messages stay out)
    registered = [w for w in range(1, workers + 1) if rng.random() < 0.8]
    rng.shuffle(registered)
    return stream, [("put", w) for w in registered]


def reference_dump(stream: list[tuple[int, bytes]], discovery: list[tuple[str, int]]) -> list[RouterEvent]:
    """A replica started after everything was published: discovery first, then the stream."""
    ref = Replica(buffer=1 << 30, tracked=1 << 20)
    for op in discovery:
        ref.discovery(op)
    while ref.kv(stream):
        pass
    return ref.dump()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10_000),
    buffer=st.sampled_from([0, 300, 2_000, 1 << 20]),
    tracked=st.sampled_from([1, 2, 64]),
    choices=st.lists(st.integers(0, 15), min_size=0, max_size=300),
    restart_at=st.one_of(st.none(), st.sampled_from(range(1, 90))),
    from_snapshot=st.booleans(),
)
def test_every_interleaving_and_restart_reaches_the_reference_index(seed, buffer, tracked, choices, restart_at, from_snapshot) -> None:
    stream, discovery = build_streams(seed, workers=5, messages=60)
    expected = reference_dump(stream, discovery)
    rep = Replica(buffer=buffer, tracked=tracked)
    pending = list(discovery)
    seen: list[tuple[str, int]] = []
    steps = 0
    it = iter(choices)
    snap: LoadedSnapshot | None = None
    while True:
        steps += 1
        snap = rep.snapshot() or snap  # the snapshot loop writes whenever it may
        if restart_at is not None and steps == restart_at:
            rep.restart(snap if from_snapshot else None, seen, stream)
        c = next(it, 2)  # 0: a discovery change, 1: a probe answer, else: the next KV message
        if c < 1 and pending:
            op = pending.pop(0)
            seen.append(op)
            rep.discovery(op)
        elif c < 2 and rep.probes:
            rep.probe(stream)
        elif not rep.kv(stream):
            if pending:
                op = pending.pop(0)
                seen.append(op)
                rep.discovery(op)
            elif not rep.probe(stream):
                break
        adm = rep.core.admission.pools["p"]
        assert adm.held_bytes <= max(buffer, 0)
        assert len(adm.first_seq) <= tracked
    assert rep.dump() == expected


def test_a_flood_of_unregistered_workers_stays_within_the_buffer() -> None:
    rep = Replica(buffer=50_000, tracked=100)
    wl = Workload(1, workers=1000, dp_ranks=1)
    stream = [(m[0].worker_id, codec.encode_json(m)) for m in (wl.message() for _ in range(5000))]
    while rep.kv(stream):
        pass
    adm = rep.core.admission.pools["p"]
    assert adm.held_bytes <= 50_000 and len(adm.first_seq) <= 100 and adm.floor is not None
    assert rep.core.states["p"].index.blocks == 0
    assert rep.core.states["p"].events_since_snapshot == 0
