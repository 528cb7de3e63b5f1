"""What was accepted, what the stream holds, what every replica applied, what bookings are left.

- `audit_stream`: reads `KVR_KV` from its first message (the product's own `StreamFollower`) and
  checks it against the acks: every probe ack's sequence holds that probe message, and every KV
  event the simulated workers had acknowledged is there (event ids per worker without holes).
- `compare_replicas`: waits until every index replica (indexers, schedulers' replicas) and a fresh
  witness that replays the whole stream have applied its last sequence, then compares their
  `/digest`s; the schedulers' load views are compared with each other.
- `bookings_after`: the bookings every scheduler still holds once the cleanup window has passed.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from schemas import codec
from schemas.events import RouterEvent
from services.indexer.admission import parse_kv_subject
from services.runtime.follower import StreamFollower

from .load import ProbePublisher
from .stack import NAMES, Stack, witness


@dataclass
class StreamAudit:
    first_seq: int = 0
    last_seq: int = 0
    messages: int = 0
    probe_acked: int = 0  # messages the probes had acknowledged
    probe_missing: int = 0  # acknowledged, but the stream holds something else (or nothing) there
    workers_acked_events: int = 0  # the simulated workers' own count of acknowledged events
    workers_stream_events: int = 0  # their events the stream holds
    workers_publish_failures: int = 0  # messages they gave up on (never acknowledged)
    event_id_holes: int = 0  # event ids missing inside each simulated worker's range in the stream
    undecodable: int = 0
    # the workers' /metrics never answered: their counts above are unknown, so is the loss
    workers_metrics_error: str | None = None

    @property
    def accepted(self) -> int:
        return self.probe_acked + self.workers_acked_events

    @property
    def lost(self) -> int:
        """Acknowledged events the stream does not hold. A hole in a worker's event ids is a loss
        unless that worker gave up on a publish (then it was never acknowledged)."""
        holes = self.event_id_holes if self.workers_publish_failures == 0 else 0
        return self.probe_missing + max(0, self.workers_acked_events - self.workers_stream_events) + holes

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "accepted": self.accepted, "lost": self.lost}


StoredMessage = tuple[int, str, bytes, dict[str, str] | None]  # seq, subject, data, headers


async def read_stream(stack: Stack, stream: str, filters: list[str], timeout: float = 120.0) -> list[StoredMessage]:
    """Every message of `stream` matching `filters`, in order, from its first to its last sequence."""
    assert stack.nc is not None
    info = await stack.nc.jetstream().stream_info(stream)
    last = info.state.last_seq
    out: list[StoredMessage] = []
    if info.state.messages == 0:
        return out
    follower = StreamFollower(stack.nc, stream, filters, lambda seq, subj, data, hdrs: out.append((seq, subj, data, hdrs)),
                              start_seq=1, name="faults-audit", track_history=False)
    follower.start()
    try:
        deadline = time.monotonic() + timeout
        while follower.applied_seq < last:
            if time.monotonic() > deadline:
                raise TimeoutError(f"read {follower.applied_seq} of {last} messages of {stream}")
            await asyncio.sleep(0.05)
    finally:
        await follower.stop()
    return [m for m in out if m[0] <= last]


async def audit_stream(stack: Stack, probes: list[ProbePublisher]) -> StreamAudit:
    assert stack.nc is not None
    pool = stack.cfg.pool
    res = StreamAudit()
    info = await stack.nc.jetstream().stream_info(NAMES.kv_stream)
    res.first_seq, res.last_seq = info.state.first_seq, info.state.last_seq
    messages = await read_stream(stack, NAMES.kv_stream, [NAMES.kv_filter(pool)])
    res.messages = len(messages)
    by_seq = {seq: (hdrs or {}).get("Nats-Msg-Id", "") for seq, _, _, hdrs in messages}
    for probe in probes:
        res.probe_acked += len(probe.acked)
        res.probe_missing += sum(1 for seq, msg_id in probe.acked if by_seq.get(seq) != msg_id)
    ids: dict[int, set[int]] = {w: set() for w in stack.cfg.worker_ids}
    for _seq, subject, data, hdrs in messages:
        parsed = parse_kv_subject(subject, NAMES.prefix)
        if parsed is None or parsed[1] not in ids:
            continue
        try:
            payload: RouterEvent | list[RouterEvent] = codec.decode(data, RouterEvent | list[RouterEvent], codec.content_type_of(hdrs))
        except codec.SchemaError:
            res.undecodable += 1
            continue
        events = payload if isinstance(payload, list) else [payload]
        ids[parsed[1]].update(ev.event.event_id for ev in events)
    res.workers_stream_events = sum(len(s) for s in ids.values())
    res.event_id_holes = sum(max(s) - min(s) + 1 - len(s) for s in ids.values() if s)
    acked = _workers_counter(stack, "kvr_mock_worker_kv_events_total")
    failures = _workers_counter(stack, "kvr_mock_worker_kv_publish_failures_total")
    if acked != acked or failures != failures:  # NaN: the audit goes on, the run is marked not ok
        res.workers_metrics_error = f"the workers' /metrics did not answer in {WORKERS_SCRAPE_ATTEMPTS} attempts"
    else:
        res.workers_acked_events, res.workers_publish_failures = int(acked), int(failures)
    return res


WORKERS_SCRAPE_ATTEMPTS = 3


def _workers_counter(stack: Stack, prefix: str) -> float:
    """A counter of the simulated workers, given a few chances (each 5 s) to answer; NaN if it never does."""
    value = float("nan")
    for _ in range(WORKERS_SCRAPE_ATTEMPTS):
        value = stack.metric("workers", prefix, timeout=5.0)
        if value == value:
            break
    return value


@dataclass
class ReplicaReport:
    stream_last_seq: int = 0
    # name → {"applied_seq", "index" (digest), "blocks"}; includes "witness"
    index: dict[str, dict[str, Any]] = field(default_factory=dict)
    # scheduler name → {"applied_seq" (bookings), "load" (digest), "bookings"}
    load: dict[str, dict[str, Any]] = field(default_factory=dict)
    witness_replay_s: float = 0.0

    @property
    def index_identical(self) -> bool:
        digests = {v.get("index") for v in self.index.values()}
        return len(digests) == 1 and None not in digests and all(v.get("applied_seq") == self.stream_last_seq for v in self.index.values())

    @property
    def diverged(self) -> list[str]:
        want = self.index.get("witness", {}).get("index")
        return sorted(n for n, v in self.index.items() if v.get("index") != want or v.get("applied_seq") != self.stream_last_seq)

    @property
    def load_identical(self) -> bool:
        return len({v.get("load") for v in self.load.values()}) == 1

    def as_dict(self) -> dict[str, Any]:
        short = {n: {**v, "index": (v.get("index") or "")[:16]} for n, v in self.index.items()}
        return {"stream_last_seq": self.stream_last_seq, "index": short, "load": self.load, "index_identical": self.index_identical,
                "diverged": self.diverged, "load_identical": self.load_identical, "witness_replay_s": self.witness_replay_s}


def _index_of(stack: Stack, name: str) -> dict[str, Any]:
    pool = stack.cfg.pool
    d = stack.digest(name)
    if name.startswith("scheduler"):
        d = d.get("index") or {}
    p = (d.get("pools") or {}).get(pool) or {}
    return {"applied_seq": d.get("applied_seq"), "index": p.get("index"), "blocks": sum((p.get("blocks") or {}).values())}


async def compare_replicas(stack: Stack, timeout: float = 120.0) -> ReplicaReport:
    """Once the KV stream is quiet: every index replica and a fresh witness, at the stream's last
    sequence, must hold the same index; the schedulers' load views must be the same."""
    assert stack.nc is not None
    pool = stack.cfg.pool
    rep = ReplicaReport()
    rep.stream_last_seq = (await stack.nc.jetstream().stream_info(NAMES.kv_stream)).state.last_seq
    replicas = [*stack.service_names("indexer"), *stack.service_names("scheduler")]
    deadline = time.monotonic() + timeout
    while not all((stack.kv_applied(n) or 0) >= rep.stream_last_seq for n in replicas):
        if time.monotonic() > deadline:
            break  # reported as diverged below
        await asyncio.sleep(0.1)
    w = witness(stack)
    stack.procs["witness"] = w
    try:
        started = time.monotonic()
        w.start()
        await asyncio.to_thread(w.wait_ready, timeout)
        while (stack.kv_applied("witness") or 0) < rep.stream_last_seq and time.monotonic() < started + timeout:
            await asyncio.sleep(0.05)
        rep.witness_replay_s = round(time.monotonic() - started, 2)
        for name in [*replicas, "witness"]:
            rep.index[name] = await asyncio.to_thread(_index_of, stack, name)
    finally:
        w.terminate()
        del stack.procs["witness"]
    for name in stack.service_names("scheduler"):
        d = (await asyncio.to_thread(stack.digest, name))
        p = (d.get("pools") or {}).get(pool) or {}
        rep.load[name] = {"applied_seq": d.get("applied_seq"), "load": p.get("load"), "bookings": p.get("bookings")}
    return rep


async def bookings_after(stack: Stack, window_s: float) -> tuple[dict[str, int], float | None]:
    """Bookings each scheduler holds at the end of the cleanup window (-1: it did not answer), and
    how long after the window opened none was held any more."""
    started = time.monotonic()
    gone_at: float | None = None
    held: dict[str, int] = {}
    while True:
        held = {}
        for name in stack.service_names("scheduler"):
            state = await stack.scheduler_state(name)
            held[name] = len(state["bookings"]) if "bookings" in state else -1  # -1: did not answer
        if gone_at is None and not any(held.values()):
            gone_at = time.monotonic() - started
        if time.monotonic() - started >= window_s:
            return held, gone_at
        await asyncio.sleep(0.2)
